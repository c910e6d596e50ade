//! Unix domain sockets: a stale socket file is replaced, a live one or a non-socket file
//! never is, and a listener removes its own file when dropped.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};

use crate::address::Address;
use crate::error::TransportError;
use crate::stream::{BoxedStream, Listener, Peer};

pub(crate) async fn connect(addr: &Address, path: &Path) -> Result<BoxedStream, TransportError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| TransportError::io(addr, e))?;
    Ok(Box::new(stream))
}

/// A Unix listener that removes its socket file when dropped.
struct Unix {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file this listener created, so that dropping it
    /// never removes a file another listener has put at the same path since.
    file: Option<(u64, u64)>,
    local: Address,
}

fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Drop for Unix {
    fn drop(&mut self) {
        if self.file.is_some() && identity(&self.path) == self.file {
            // Best effort: a file that cannot be removed is replaced as stale on the next
            // bind anyway.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[async_trait::async_trait]
impl Listener for Unix {
    async fn accept(&self) -> io::Result<(BoxedStream, Peer)> {
        let (stream, _) = self.listener.accept().await?;
        let cred = stream.peer_cred().ok();
        let peer = Peer::Unix {
            uid: cred.map(|c| c.uid()),
            pid: cred.and_then(|c| c.pid()),
        };
        Ok((Box::new(stream), peer))
    }

    fn local_addr(&self) -> Address {
        self.local.clone()
    }
}

pub(crate) async fn bind(addr: &Address, path: &Path) -> Result<Box<dyn Listener>, TransportError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // A socket file left by a crashed server is removed; one with a live listener
            // is not: that would steal another server's address. Only a refusal proves the
            // file stale (permission errors and the like are reported instead).
            match UnixStream::connect(path).await {
                Ok(_) => return Err(TransportError::InUse { addr: addr.clone() }),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).map_err(|e| TransportError::bind_io(addr, e))?;
                }
                Err(e) => {
                    return Err(TransportError::Io {
                        addr: addr.clone(),
                        source: e,
                    });
                }
            }
        }
        Ok(_) => return Err(TransportError::NotASocket { addr: addr.clone() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(TransportError::Io {
                addr: addr.clone(),
                source: e,
            });
        }
    }
    let listener = UnixListener::bind(path).map_err(|e| TransportError::bind_io(addr, e))?;
    Ok(Box::new(Unix {
        listener,
        file: identity(path),
        path: path.to_owned(),
        local: addr.clone(),
    }))
}
