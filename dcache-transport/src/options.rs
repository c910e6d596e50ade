//! Settings shared by every transport.

use crate::tls_config::{TlsClient, TlsServer};

/// Settings shared by every transport: buffer sizes that decide how many bytes can be
/// committed ahead of the application, and the TLS settings `tls://` addresses use.
///
/// Marked `#[non_exhaustive]` so settings can be added without breaking callers: start from
/// [`TransportOptions::default`] and change fields or use the `with_` methods.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TransportOptions {
    /// Kernel send buffer (`SO_SNDBUF`) for TCP sockets, connected and accepted.
    ///
    /// Small on purpose. Bytes handed to the kernel can no longer be recalled: if a client
    /// could push megabytes of source into a large (or autotuned, up to several MiB on
    /// Linux) send buffer in an instant, an early result arriving one round trip later
    /// would find the whole upload already committed and the early stop would save
    /// nothing. With a modest buffer the writer sees backpressure after a few hundred KiB,
    /// so aborting an upload really stops it. 256 KiB still keeps a 1 Gbit/s link full at
    /// a 2 ms round trip. The kernel may round the value (Linux doubles it, and caps it at
    /// `net.core.wmem_max`); the receive side keeps the kernel's autotuning.
    pub tcp_send_buffer: usize,
    /// Capacity, in bytes, of each direction of an in-memory (`mem://`) pipe: how much a
    /// writer may get ahead of its reader before it waits, so in-process peers have the
    /// same bounded memory and backpressure as sockets.
    pub mem_buffer: usize,
    /// What a client trusts and presents when it connects to a `tls://` address. `None`:
    /// the system's trusted CAs and no client certificate.
    pub tls_client: Option<TlsClient>,
    /// The certificate a `tls://` listener serves (and the client CA it requires, if
    /// any). Binding a `tls://` address without it fails: a server has no default
    /// certificate.
    pub tls_server: Option<TlsServer>,
}

impl Default for TransportOptions {
    fn default() -> Self {
        Self {
            tcp_send_buffer: 256 * 1024,
            mem_buffer: 256 * 1024,
            tls_client: None,
            tls_server: None,
        }
    }
}

impl TransportOptions {
    /// These options with another TCP send buffer size (see
    /// [`tcp_send_buffer`](Self::tcp_send_buffer) for why it matters).
    pub fn with_tcp_send_buffer(mut self, bytes: usize) -> Self {
        self.tcp_send_buffer = bytes;
        self
    }

    /// These options with another in-memory pipe capacity (at least one byte is used).
    pub fn with_mem_buffer(mut self, bytes: usize) -> Self {
        self.mem_buffer = bytes;
        self
    }

    /// These options with the TLS settings a client uses for `tls://` addresses.
    pub fn with_tls_client(mut self, tls: TlsClient) -> Self {
        self.tls_client = Some(tls);
        self
    }

    /// These options with the certificate (and client CA) `tls://` listeners serve.
    pub fn with_tls_server(mut self, tls: TlsServer) -> Self {
        self.tls_server = Some(tls);
        self
    }
}
