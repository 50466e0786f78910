//! The client side of ferryd's control socket, one type for every caller: a VMM's
//! region-mode calls ([`crate::migrate::vmm`]), `ferryctl`'s commands run through ferryd,
//! the demo and the tests. A request is one JSON line (with descriptors by SCM_RIGHTS
//! where it takes some); ferryd answers with events (`{"event":...}`) and one final
//! reply, `{"ok":true,...}` or `{"ok":false,"error":...,"kind":...}`, which
//! [`Client::reply`] turns into [`ClientError::Ferryd`] with its [`Failure`].

use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use hw::fdpass::LineConn;
use serde::Deserialize;
use serde_json::Value;

use crate::metrics::Failure;
use crate::protocol::Event;

/// Why a call on ferryd's control socket failed: ferryd said why (with the kind of
/// failure), or the conversation itself broke.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach ferryd at {}: {source}", socket.display())]
    Connect { socket: PathBuf, source: std::io::Error },
    #[error("writing to ferryd: {0}")]
    Write(#[source] std::io::Error),
    #[error("reading from ferryd: {0}")]
    Read(#[source] std::io::Error),
    #[error("ferryd closed the control connection")]
    Closed,
    #[error("ferryd sent a bad reply ({source}): {line}")]
    BadReply { line: String, source: serde_json::Error },
    /// ferryd's own error reply.
    #[error("{message}")]
    Ferryd { kind: Failure, message: String },
    #[error("ferryd sent {got} where {wanted} was due")]
    Unexpected { got: Value, wanted: &'static str },
    #[error("ferryd handed over {got} memory descriptor(s) for {regions} region(s)")]
    Descriptors { got: usize, regions: usize },
    #[error(transparent)]
    Userfault(#[from] hw::uffd::UffdError),
    #[error("the source switched to post-copy: a VMM that takes it calls MigrateIn::next")]
    Postcopy,
}

impl ClientError {
    /// `got` came where `wanted` was due.
    pub fn unexpected(got: &Event, wanted: &'static str) -> ClientError {
        ClientError::Unexpected { got: got.to_value(), wanted }
    }

    /// ferryd's kind of failure, when ferryd said it.
    pub fn kind(&self) -> Option<Failure> {
        match self {
            ClientError::Ferryd { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// A connection to ferryd's control socket.
#[derive(Debug)]
pub struct Client {
    conn: LineConn,
}

impl Client {
    pub fn connect(socket: &Path) -> Result<Client, ClientError> {
        let s = UnixStream::connect(socket).map_err(|source| ClientError::Connect { socket: socket.to_path_buf(), source })?;
        Ok(Client { conn: LineConn::new(s) })
    }

    /// Sends one request line (any serializable request: [`crate::daemon::Request`] or a
    /// JSON value), with `fds`.
    pub fn send(&self, request: &impl serde::Serialize, fds: &[BorrowedFd<'_>]) -> Result<(), ClientError> {
        let line = serde_json::to_string(request).expect("requests serialize");
        self.conn.send(&line, fds).map_err(ClientError::Write)
    }

    /// The next line from ferryd as JSON, with its descriptors: an event or the final
    /// `{"ok":true}`; an `{"ok":false}` is the error.
    pub fn reply(&mut self) -> Result<(Value, Vec<OwnedFd>), ClientError> {
        let (line, fds) = self.conn.recv().map_err(ClientError::Read)?.ok_or(ClientError::Closed)?;
        let v: Value = serde_json::from_str(&line).map_err(|source| ClientError::BadReply { line: line.clone(), source })?;
        if v["ok"] == false {
            let kind = serde_json::from_value(v["kind"].clone()).unwrap_or(Failure::Other);
            let message = v["error"].as_str().unwrap_or("ferryd failed without a reason").to_string();
            return Err(ClientError::Ferryd { kind, message });
        }
        Ok((v, fds))
    }

    /// The next line, which must be an event (`wanted` names what was due), with the
    /// descriptors that came with it.
    pub fn event(&mut self, wanted: &'static str) -> Result<(Event, Vec<OwnedFd>), ClientError> {
        let (v, fds) = self.reply()?;
        if v.get("event").is_none() {
            return Err(ClientError::Unexpected { got: v, wanted });
        }
        let e = Event::deserialize(&v).map_err(|_| ClientError::Unexpected { got: v.clone(), wanted })?;
        Ok((e, fds))
    }

    /// The next line, which must be the final reply, as `T` (`wanted` names it).
    pub fn done<T: serde::de::DeserializeOwned>(&mut self, wanted: &'static str) -> Result<T, ClientError> {
        let (v, _) = self.reply()?;
        body(v, wanted)
    }

    /// Follows the replies to the final one (returned as `T`), handing each event to
    /// `on_event`.
    pub fn until_done<T: serde::de::DeserializeOwned>(
        &mut self,
        wanted: &'static str,
        on_event: &mut dyn FnMut(&Event),
    ) -> Result<T, ClientError> {
        loop {
            let (v, _) = self.reply()?;
            if v.get("event").is_none() {
                return body(v, wanted);
            }
            // An event this client does not know (a newer ferryd's) is passed over.
            if let Ok(e) = serde_json::from_value::<Event>(v) {
                on_event(&e);
            }
        }
    }

    /// The connection itself: shut it down to call a request off.
    pub fn stream(&self) -> &UnixStream {
        self.conn.stream()
    }
}

/// A final reply as a `T`, or it was not what was `wanted`.
fn body<T: serde::de::DeserializeOwned>(v: Value, wanted: &'static str) -> Result<T, ClientError> {
    T::deserialize(&v).map_err(|_| ClientError::Unexpected { got: v.clone(), wanted })
}
