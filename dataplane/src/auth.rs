//! Peer authentication: a pre-shared key and an HMAC-SHA256 challenge-response in both
//! directions, so each side proves it holds the key before any data moves. Both nonces
//! are fresh per connection, so a recorded handshake cannot be replayed. The handshake
//! leaves both sides with the connection's frame keys ([`crate::session::seal`]); ACCEPT
//! is the first frame sealed with them.
//!
//! Nothing the handshake reads is larger than [`crate::conn::PREAUTH_MAX_PAYLOAD`]; the
//! listening side bounds its time and bytes in all (see [`crate::session::accept`]).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zerocopy::IntoBytes;

use crate::conn::{AuthError, SessionError, Violation, expect_frame, expect_plain_frame, send_plain_error, write_frame, write_plain_frame};
use crate::session::seal::{Keys, Side};
use crate::wire::{self, Challenge, Hello, Kind, Response, VERSION, features};

/// A pre-shared key (at least 16 bytes).
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({} bytes)", self.0.len())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("key file {path} is readable by group or others (mode {mode:o}): chmod 600 {path}")]
    Permissions { path: String, mode: u32 },
    #[error("key file {path} must hold at least 32 hex digits (16 bytes) on one line: `ferryctl keygen --out {path}` writes one")]
    Format { path: String },
}

impl Key {
    pub fn from_bytes(bytes: Vec<u8>) -> Option<Key> {
        (bytes.len() >= 16).then_some(Key(bytes))
    }

    /// Reads a key file: hex digits on one line, mode 0600 or stricter.
    pub fn load(path: &Path) -> Result<Key, KeyError> {
        let p = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| KeyError::Read { path: p.clone(), source })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions { path: p, mode });
        }
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read { path: p.clone(), source })?;
        let hex = text.trim();
        if hex.len() % 2 != 0 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(KeyError::Format { path: p });
        }
        let bytes = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digits")).collect();
        Key::from_bytes(bytes).ok_or(KeyError::Format { path: p })
    }

    /// A new random 32-byte key, as hex.
    pub fn generate_hex() -> Result<String, getrandom::Error> {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k)?;
        Ok(k.iter().map(|b| format!("{b:02x}")).collect())
    }

    fn mac(&self, label: &[u8], a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(label);
        m.update(a);
        m.update(b);
        m.finalize().into_bytes().into()
    }

    fn verify(&self, label: &[u8], a: &[u8; 32], b: &[u8; 32], tag: &[u8; 32]) -> bool {
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(label);
        m.update(a);
        m.update(b);
        m.verify_slice(tag).is_ok()
    }
}

/// How a connection is authenticated.
#[derive(Debug, Clone)]
pub enum Auth {
    Key(Key),
    /// `--insecure-no-auth`: both sides must say so.
    Insecure,
}

const SERVER_LABEL: &[u8] = b"ferry-v1 server";
const CLIENT_LABEL: &[u8] = b"ferry-v1 client";

fn nonce() -> Result<[u8; 32], SessionError> {
    let mut n = [0u8; 32];
    SessionError::random("a nonce", &mut n)?;
    Ok(n)
}

fn our_features(auth: &Auth) -> u64 {
    match auth {
        Auth::Key(_) => features::ZSTD,
        Auth::Insecure => features::ZSTD | features::NO_AUTH,
    }
}

fn psk(auth: &Auth) -> Option<&[u8]> {
    match auth {
        Auth::Key(k) => Some(&k.0),
        Auth::Insecure => None,
    }
}

/// The connecting side: HELLO, check the receiver's proof, send ours, wait for ACCEPT.
/// `offer` adds optional features (such as [`features::RDMA`]) to those every build has.
/// Returns the features both sides use, and the connection's frame keys.
pub fn client_handshake<S: Read + Write>(s: &mut S, auth: &Auth, lane: u16, session: u64, offer: u64) -> Result<(u64, Keys), SessionError> {
    let nc = nonce()?;
    let hello = Hello {
        version: VERSION.into(),
        lane: lane.into(),
        _pad: 0.into(),
        features: (our_features(auth) | offer).into(),
        session: session.into(),
        nonce: nc,
    };
    write_plain_frame(s, Kind::Hello, hello.as_bytes())?;
    let mut buf = Vec::new();
    expect_plain_frame(s, Kind::Challenge, &mut buf)?;
    let ch: Challenge = wire::parse(Kind::Challenge, &buf)?;
    let peer_insecure = ch.features.get() & features::NO_AUTH != 0;
    let mac = match (auth, peer_insecure) {
        (Auth::Key(k), false) => {
            if !k.verify(SERVER_LABEL, &nc, &ch.nonce, &ch.mac) {
                send_plain_error(s, "authentication failed: the receiver's proof does not match our key");
                return Err(AuthError::ReceiverKey.into());
            }
            k.mac(CLIENT_LABEL, &ch.nonce, &nc)
        }
        (Auth::Insecure, true) => [0u8; 32],
        (Auth::Key(_), true) => {
            return Err(AuthError::ReceiverInsecure.into());
        }
        (Auth::Insecure, false) => return Err(AuthError::ReceiverNeedsKey.into()),
    };
    write_plain_frame(s, Kind::Response, Response { mac }.as_bytes())?;
    let mut keys = Keys::derive(psk(auth), Side::Client, &nc, &ch.nonce);
    expect_frame(s, &mut keys.rx, Kind::Accept, &mut buf)?;
    Ok((ch.features.get() & (our_features(auth) | offer), keys))
}

/// The listening side: read HELLO, prove the key, check the peer's proof. `offer` adds
/// optional features. Returns the peer's HELLO (lane, session) once it is authenticated,
/// its `features` narrowed to those both sides use, and the connection's frame keys.
pub fn server_handshake<S: Read + Write>(s: &mut S, auth: &Auth, offer: u64) -> Result<(Hello, Keys), SessionError> {
    let mut buf = Vec::new();
    expect_plain_frame(s, Kind::Hello, &mut buf)?;
    let hello: Hello = wire::parse(Kind::Hello, &buf)?;
    if hello.version.get() != VERSION {
        let e = Violation::Version { got: hello.version.get(), ours: VERSION };
        send_plain_error(s, &e.to_string());
        return Err(e.into());
    }
    let peer_insecure = hello.features.get() & features::NO_AUTH != 0;
    let ns = nonce()?;
    let mac = match (auth, peer_insecure) {
        (Auth::Key(k), false) => k.mac(SERVER_LABEL, &hello.nonce, &ns),
        (Auth::Insecure, true) => [0u8; 32],
        (Auth::Key(_), true) => {
            send_plain_error(s, "this receiver requires a key: the sender must pass --key");
            return Err(AuthError::SenderInsecure.into());
        }
        (Auth::Insecure, false) => {
            send_plain_error(s, "this receiver runs without authentication: pass --insecure-no-auth to the sender too");
            return Err(AuthError::SenderHasKey.into());
        }
    };
    let ours = our_features(auth) | offer;
    let ch = Challenge { version: VERSION.into(), _pad: [0; 6], features: ours.into(), nonce: ns, mac };
    write_plain_frame(s, Kind::Challenge, ch.as_bytes())?;
    expect_plain_frame(s, Kind::Response, &mut buf)?;
    let resp: Response = wire::parse(Kind::Response, &buf)?;
    if let Auth::Key(k) = auth
        && !k.verify(CLIENT_LABEL, &ns, &hello.nonce, &resp.mac)
    {
        send_plain_error(s, "authentication failed: wrong key");
        return Err(AuthError::SenderKey.into());
    }
    let mut keys = Keys::derive(psk(auth), Side::Server, &hello.nonce, &ns);
    write_frame(s, &mut keys.tx, Kind::Accept, &[])?;
    let mut hello = hello;
    hello.features = (hello.features.get() & ours).into();
    Ok((hello, keys))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn key(b: u8) -> Auth {
        Auth::Key(Key::from_bytes(vec![b; 32]).unwrap())
    }

    fn run(client: Auth, server: Auth) -> (Result<u64, SessionError>, Result<Hello, SessionError>) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || server_handshake(&mut b, &server, features::RDMA));
        let c = client_handshake(&mut a, &client, 3, 77, 0);
        drop(a);
        (c.map(|(f, _)| f), t.join().unwrap().map(|(h, _)| h))
    }

    /// Both sides leave the handshake with matching keys: what one seals, the other
    /// verifies.
    #[test]
    fn keys_agree() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let (_, mut keys) = server_handshake(&mut b, &key(5), 0).unwrap();
            write_frame(&mut b, &mut keys.tx, Kind::Done, b"from the server").unwrap();
            let mut buf = Vec::new();
            expect_frame(&mut b, &mut keys.rx, Kind::Round, &mut buf).unwrap();
            buf
        });
        let (_, mut keys) = client_handshake(&mut a, &key(5), 0, 0, 0).unwrap();
        let mut buf = Vec::new();
        expect_frame(&mut a, &mut keys.rx, Kind::Done, &mut buf).unwrap();
        assert_eq!(buf, b"from the server");
        write_frame(&mut a, &mut keys.tx, Kind::Round, b"from the client").unwrap();
        assert_eq!(t.join().unwrap(), b"from the client");
    }

    #[test]
    fn same_key_both_ways() {
        let (c, s) = run(key(1), key(1));
        assert_eq!(c.unwrap(), features::ZSTD, "RDMA is offered by one side only");
        let h = s.unwrap();
        assert_eq!(h.features.get(), features::ZSTD);
        assert_eq!((h.lane.get(), h.session.get()), (3, 77));
    }

    #[test]
    fn wrong_key_fails_on_both_sides() {
        let (c, s) = run(key(1), key(2));
        assert!(matches!(c, Err(SessionError::Auth(_))), "{c:?}");
        assert!(s.is_err());
    }

    #[test]
    fn insecure_must_be_mutual() {
        let (c, s) = run(Auth::Insecure, Auth::Insecure);
        assert!(c.is_ok() && s.is_ok());
        let (c, s) = run(Auth::Insecure, key(1));
        assert!(c.is_err() && matches!(s, Err(SessionError::Auth(_))));
        let (c, s) = run(key(1), Auth::Insecure);
        assert!(c.is_err() && s.is_err());
    }

    #[test]
    fn key_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, Key::generate_hex().unwrap() + "\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        Key::load(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(Key::load(&p), Err(KeyError::Permissions { .. })));
        std::fs::write(&p, "abc").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(Key::load(&p), Err(KeyError::Format { .. })));
        std::fs::write(&p, "00112233").unwrap();
        assert!(matches!(Key::load(&p), Err(KeyError::Format { .. })), "too short");
    }
}
