//! One distcc connection: read the request whole, refuse early what cannot be served,
//! submit the job to the service, write the reply.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dcache_proto::{CacheKey, ClientConfig, ErrorCode, JobDesc, Strategy};
use dcache_transport::{BoxedStream, JobError, Peer, spawn_client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, watch};

use super::DistccConfig;
use super::argv::job_from_argv;
use super::wire::{Protocol, RequestDecoder, RequestItem, encode_reply};
use crate::Service;
use crate::counters::Counters;
use crate::spool::MemoryShare;

/// Read size while the command line arrives (it is small; the source is reserved whole
/// once its length is known and accounted for).
const HEADER_READ: usize = 16 * 1024;
/// Buffer of the in-process pipe to the service.
const PIPE_BUFFER: usize = 256 * 1024;

/// How a connection ended without a reply.
enum End {
    /// The job is not served here; the client compiles locally.
    Refused(String),
    /// The request was malformed, oversized, truncated or too slow.
    Error(String),
}

/// Serves one distcc connection from `peer`, holding `handshake` (a place in the
/// service's handshake pool) until the command line has been read.
pub(crate) async fn serve_connection(
    service: Arc<Service>,
    mut stream: BoxedStream,
    peer: Peer,
    config: Arc<DistccConfig>,
    stop: watch::Receiver<bool>,
    handshake: OwnedSemaphorePermit,
) {
    let counters = service.counters();
    Counters::bump(&counters.distcc_connections);
    let who: Arc<str> = format!("distcc {peer}").into();
    match serve(&service, &mut stream, &config, stop, handshake, &who).await {
        Ok(()) => {}
        Err(End::Refused(why)) => {
            Counters::bump(&counters.distcc_refused);
            tracing::info!("distcc {peer}: not served, the client compiles locally: {why}");
        }
        Err(End::Error(why)) => {
            Counters::bump(&counters.distcc_errors);
            tracing::info!("distcc {peer}: connection dropped: {why}");
        }
    }
    // Dropping the stream closes it: for a refusal, that is the answer.
}

async fn serve(
    service: &Arc<Service>,
    stream: &mut BoxedStream,
    config: &DistccConfig,
    mut stop: watch::Receiver<bool>,
    handshake: OwnedSemaphorePermit,
    peer: &Arc<str>,
) -> Result<(), End> {
    let protocol_cfg = service.protocol();
    let mut limits = config.limits;
    limits.max_source = limits
        .max_source
        .min(u32::try_from(protocol_cfg.limits.max_source_len).unwrap_or(u32::MAX));
    let mut decoder = RequestDecoder::new(limits);
    let mut buf = BytesMut::with_capacity(HEADER_READ);
    let mut reader = Reader {
        stream,
        stop: &mut stop,
    };

    // The protocol and the command line, within the handshake timeout.
    let handshake_timeout = protocol_cfg.handshake_timeout;
    let deadline = tokio::time::Instant::now() + handshake_timeout;
    let mut protocol = None;
    let argv = loop {
        match decoder.decode(&mut buf) {
            Ok(Some(RequestItem::Protocol(p))) => protocol = Some(p),
            Ok(Some(RequestItem::Argv(argv))) => break argv,
            Ok(Some(_)) => return Err(End::Error("request out of order".into())),
            Ok(None) => reader.read(&mut buf, HEADER_READ, Some(deadline)).await?,
            Err(e @ super::wire::WireError::Version(_)) => {
                // Pump mode: closing makes the stock client compile this file locally.
                return Err(End::Refused(e.to_string()));
            }
            Err(e) => return Err(End::Error(e.to_string())),
        }
    };
    let protocol = protocol.unwrap_or(Protocol::Plain);
    let mut desc = job_from_argv(&argv, &config.names).map_err(End::Refused)?;
    // A stock client cannot name its compiler's identity: the job asks for this server's
    // compiler of that name, as distccd would run it, so its key is the one a dcache
    // client with the same compiler computes.
    desc.identity = service.identity_of(&desc.compiler);
    // Refused before the source is read: the client stops uploading and compiles locally.
    service
        .check_job(&desc)
        .map_err(|e| End::Refused(e.to_string()))?;
    drop(handshake);

    // The source, each read within the stall timeout, its length accounted for in the
    // service's memory allowance before it is buffered.
    let stall = protocol_cfg.stall_timeout;
    let mut share: Option<MemoryShare> = None;
    let mut reserved = 0;
    let source = loop {
        match decoder.decode(&mut buf) {
            Ok(Some(RequestItem::Source(source))) => break source,
            Ok(Some(_)) => return Err(End::Error("request out of order".into())),
            Ok(None) => {
                if share.is_none() {
                    if let Some(len) = decoder.source_len(&buf) {
                        let whole = super::wire::HEADER_LEN + len as usize;
                        reserved = whole;
                        share = Some(service.budget().share(whole).ok_or_else(|| {
                            End::Refused("the server's memory for uploads is in use".into())
                        })?);
                        buf.reserve(whole.saturating_sub(buf.len()));
                    }
                }
                let step = if share.is_some() {
                    buf.capacity() - buf.len()
                } else {
                    HEADER_READ
                };
                reader
                    .read(
                        &mut buf,
                        step.max(1),
                        Some(tokio::time::Instant::now() + stall),
                    )
                    .await?;
            }
            Err(e) => return Err(End::Error(e.to_string())),
        }
    };
    // A decompressed source is larger than its wire bytes: account for the difference.
    let more = source.len().saturating_sub(reserved);
    let _more = match more {
        0 => None,
        n => Some(
            service
                .budget()
                .share(n)
                .ok_or_else(|| End::Refused("the server's memory for uploads is in use".into()))?,
        ),
    };
    drop(buf);

    let outcome = submit(service, desc, source, stop.clone(), peer.clone()).await?;
    let counters = service.counters();
    Counters::bump(&counters.distcc_jobs);
    if outcome.origin.is_cached() {
        Counters::bump(&counters.distcc_hits);
    } else {
        Counters::bump(&counters.distcc_compiles);
    }
    let reply = encode_reply(protocol, &outcome.result);
    write_reply(stream, &reply, stall).await
}

/// Runs the job through an in-process dcache connection to the service: the service's
/// lookups, single-flight, slots, executor and store, exactly as for a dcache client.
/// Ask-first, so a hit copies no source.
async fn submit(
    service: &Arc<Service>,
    mut desc: JobDesc,
    source: Bytes,
    stop: watch::Receiver<bool>,
    peer: Arc<str>,
) -> Result<dcache_proto::JobOutcome, End> {
    desc.source_len = Some(source.len() as u64);
    let key = CacheKey::compute(&desc, &source);
    let (ours, theirs) = tokio::io::duplex(PIPE_BUFFER);
    let server = service.clone();
    tokio::spawn(async move {
        server
            .handle_distcc_connection(Box::new(theirs), stop, peer)
            .await;
    });
    let client = spawn_client(
        ours,
        ClientConfig {
            strategy: Strategy::AskFirst,
            auth: service.protocol().auth.clone(),
            ..ClientConfig::default()
        },
    );
    // Dropping the client when this returns closes the in-process connection.
    client
        .submit(desc, Some(key), source)
        .await
        .map_err(|e| match e {
            JobError::Failed { code, message }
                if code == ErrorCode::REFUSED
                    || code == ErrorCode::OVERLOADED
                    || code == ErrorCode::SHUTTING_DOWN =>
            {
                End::Refused(message)
            }
            e => End::Refused(format!("the job failed on this server: {e}")),
        })
}

async fn write_reply(stream: &mut BoxedStream, reply: &[u8], stall: Duration) -> Result<(), End> {
    let written = tokio::time::timeout(stall.max(Duration::from_secs(1)), async {
        stream.write_all(reply).await?;
        stream.shutdown().await
    })
    .await;
    match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(End::Error(format!("writing the reply: {e}"))),
        Err(_) => Err(End::Error("the client did not read its reply".into())),
    }
}

/// Reads from the client, bounded in size and time, giving up when the server stops.
struct Reader<'a> {
    stream: &'a mut BoxedStream,
    stop: &'a mut watch::Receiver<bool>,
}

impl Reader<'_> {
    /// Reads at most `max` more bytes into `buf`; an end of stream is a truncated request.
    async fn read(
        &mut self,
        buf: &mut BytesMut,
        max: usize,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(), End> {
        if *self.stop.borrow() {
            return Err(End::Refused("the server is shutting down".into()));
        }
        if buf.capacity() - buf.len() < max {
            buf.reserve(max);
        }
        let mut limited = (&mut *self.stream).take(max as u64);
        let read = limited.read_buf(buf);
        let timed = async {
            match deadline {
                Some(d) => tokio::time::timeout_at(d, read).await.ok(),
                None => Some(read.await),
            }
        };
        tokio::select! {
            r = timed => match r {
                None => Err(End::Error("the request stalled past its timeout".into())),
                Some(Ok(0)) => Err(End::Error("the request is truncated".into())),
                Some(Ok(_)) => Ok(()),
                Some(Err(e)) => Err(End::Error(format!("reading the request: {e}"))),
            },
            _ = self.stop.changed() => Err(End::Refused("the server is shutting down".into())),
        }
    }
}
