//! Stream mode from one command on the source host: `ferryctl stream open` has the local
//! ferryd ask the destination's ferryd (its peer port) to open the far side, and
//! `ferryctl migrate` does that around a `virsh migrate` and reports both.
//!
//! ```text
//!  ferryctl migrate vm1 qemu+ssh://dst/system                  (--to dst:7470 by default)
//!    │ stream_open {to, name, listen: unix:/run/ferry/streams/vm1-3f2a.sock}   (local ferryd's control socket)
//!    │   ferryd ══ STREAM_OPEN over the peer port ══► ferryd at dst: forwards to the same path there
//!    │ ◄ {"event":"listening"}
//!    │ virsh migrate --live vm1 qemu+ssh://dst/system --migrateuri unix:///run/ferry/streams/vm1-3f2a.sock
//!    │   source QEMU ─► ferryd ══ channels ══► ferryd ─► destination QEMU (libvirt made it listen there)
//!    │ ◄ {"ok":true,"report":...,"destination":...}
//!    └ ferry's figures beside `virsh domjobinfo --completed`
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use dataplane::daemon::Request;
use dataplane::stream::{Endpoint, ProxyReport};

use crate::error::{CtlError, Usage};
use crate::transfer;
use dataplane::client::{Client, ClientError};
use dataplane::protocol::StreamOpened;

/// Where the stream's two ends are, as the user chose them.
#[derive(clap::Args, Debug, Clone)]
pub struct Ends {
    /// The destination ferryd's peer port, HOST:PORT (`[daemon] peer` there). `ferryctl
    /// migrate`: by default the destination URI's host, port 7470.
    #[arg(long, value_name = "HOST:PORT")]
    pub to: Option<String>,
    /// The migration's name (letters, digits, . _ -). Default: a new one.
    #[arg(long)]
    pub id: Option<String>,
    /// Where this host's VMM migrates to: unix:PATH or tcp:HOST:PORT (repeatable).
    /// Default: unix:DIR/ID.sock in the local ferryd's first stream directory.
    #[arg(long, value_name = "ENDPOINT")]
    pub listen: Vec<String>,
    /// The destination VMM's incoming socket, on the destination host. Default: the
    /// first --listen (the same path on both hosts).
    #[arg(long, value_name = "ENDPOINT")]
    pub forward: Option<String>,
    /// off, zstd:N (1-19), or auto (compress while it finishes sooner). Default: the
    /// plan's.
    #[arg(long = "compression", alias = "compress", value_name = "POLICY")]
    pub compression: Option<String>,
    /// The local ferryd's control socket (default: $FERRY_SOCKET or
    /// /run/ferry/ferryd.sock).
    #[arg(long, value_name = "SOCKET")]
    pub ferryd: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

impl Ends {
    fn socket(&self) -> PathBuf {
        self.ferryd.clone().unwrap_or_else(transfer::default_socket)
    }

    fn request(&self, to: &str, name: Option<String>, progress: bool) -> Request {
        Request::StreamOpen {
            to: to.to_string(),
            name,
            listen: self.listen.clone(),
            forward: self.forward.clone(),
            compress: self.compression.clone(),
            progress,
        }
    }
}

/// What ferryd answered for a stream it opened: both sides' reports.
#[derive(Debug, serde::Serialize)]
pub struct Opened {
    /// The migration's name.
    pub name: String,
    pub source: ProxyReport,
    pub destination: ProxyReport,
}

/// A stream being opened or carried by the local ferryd, followed on a thread.
struct Running {
    /// The endpoints the VMM migrates to, once ferryd listens; then the final reply.
    events: mpsc::Receiver<Event>,
    /// The control connection: shut down to call the stream off.
    conn: std::os::unix::net::UnixStream,
}

enum Event {
    Listening { id: String, endpoints: Vec<String> },
    Done(Box<Result<StreamOpened, ClientError>>),
}

fn start(ends: &Ends, to: &str, id: Option<String>, bar: transfer::Bar) -> Result<Running, CtlError> {
    let socket = ends.socket();
    let mut client = Client::connect(&socket)?;
    let conn = client.stream().try_clone().map_err(|e| CtlError::io("cloning the control connection", e))?;
    let req = ends.request(to, id, bar.shown());
    let (tx, events) = mpsc::channel();
    std::thread::spawn(move || {
        let mut id = String::new();
        let mut on_event = |e: &dataplane::protocol::Event| match e {
            dataplane::protocol::Event::Opened { name, .. } => id = name.clone(),
            dataplane::protocol::Event::Listening { endpoints, .. } => {
                let _ = tx.send(Event::Listening { id: id.clone(), endpoints: endpoints.clone() });
            }
            _ => {}
        };
        let r = transfer::follow(&mut client, &socket, &req, &bar, "the stream's reports", &mut on_event);
        drop(bar);
        let _ = tx.send(Event::Done(Box::new(r)));
    });
    Ok(Running { events, conn })
}

impl Running {
    /// The endpoints once ferryd listens on them, or why it did not.
    fn listening(&self) -> Result<(String, Vec<String>), CtlError> {
        match self.events.recv() {
            Ok(Event::Listening { id, endpoints }) => Ok((id, endpoints)),
            Ok(Event::Done(r)) => match *r {
                Err(e) => Err(e.into()),
                Ok(_) => Err(CtlError::Stream("ferryd ended the stream before it listened")),
            },
            Err(_) => Err(ClientError::Closed.into()),
        }
    }

    /// The final reply: both sides' reports.
    fn done(&self, wait: Option<Duration>) -> Result<Opened, CtlError> {
        let ev = match wait {
            Some(w) => self.events.recv_timeout(w).map_err(|_| CtlError::StreamTimeout(w)),
            None => self.events.recv().map_err(|_| ClientError::Closed.into()),
        }?;
        let v = match ev {
            Event::Done(r) => (*r)?,
            Event::Listening { .. } => return Err(CtlError::Stream("ferryd said it listens twice")),
        };
        Ok(Opened { name: v.name, source: v.report, destination: v.destination })
    }

    /// Calls the stream off: ferryd closes an endpoint no VMM connected to.
    fn cancel(&self) {
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
    }
}

/// `ferryctl stream open` (`to`: its `--to`, which it requires): prints where the VMM
/// migrates to, then both sides' reports once the stream has ended.
pub fn open(ends: &Ends, to: &str) -> Result<Opened, CtlError> {
    let run = start(ends, to, ends.id.clone(), transfer::Bar::new(!ends.json))?;
    let (id, endpoints) = run.listening()?;
    for e in &endpoints {
        eprintln!("ferry stream {id}: the VMM migrates to {e} (forwarded to {} at {to})", ends.forward.as_deref().unwrap_or(e));
    }
    run.done(None)
}

/// The destination ferryd's peer port for a libvirt destination URI: its host, port
/// [`dataplane::peer::DEFAULT_PORT`] (`qemu+ssh://root@dst:22/system` -> `dst:7470`);
/// none for a URI without a host (`qemu:///system`).
pub fn peer_of(dest_uri: &str) -> Option<String> {
    let rest = dest_uri.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host.strip_prefix('[') {
        Some(v6) => format!("[{}]", v6.split(']').next()?),
        None => host.split(':').next()?.to_string(),
    };
    (!host.is_empty() && host != "[]").then(|| format!("{host}:{}", dataplane::peer::DEFAULT_PORT))
}

/// `virsh migrate` options ferryctl sets itself, or that would take the migration past
/// ferry (a tunnelled migration rides libvirt's own connection).
const NOT_YOURS: [&str; 4] = ["--tunnelled", "--tunneled", "--migrateuri", "--listen-address"];

/// One line per side of a finished stream.
pub fn summary(o: &Opened) -> String {
    format!("stream {}\n  {}\n  {}", o.name, o.source.line(), o.destination.line())
}

/// `ferryctl migrate`'s arguments.
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// The libvirt domain to migrate.
    pub domain: String,
    /// The destination libvirt URI (`virsh migrate`'s desturi), e.g. qemu+ssh://dst/system.
    pub dest_uri: String,
    #[command(flatten)]
    pub ends: Ends,
    /// The source libvirt URI (virsh -c). Default: virsh's.
    #[arg(long, short = 'c', value_name = "URI")]
    pub connect: Option<String>,
    /// The virsh to run.
    #[arg(long, default_value = "virsh", value_name = "PROGRAM")]
    pub virsh: PathBuf,
    /// More `virsh migrate` options, after `--` (e.g. -- --parallel --parallel-connections 4).
    #[arg(last = true, value_name = "VIRSH_OPTIONS")]
    pub virsh_options: Vec<String>,
}

/// What `ferryctl migrate` reports: ferry's two sides and libvirt's job figures.
#[derive(Debug, serde::Serialize)]
pub struct Migrated {
    pub domain: String,
    pub ferry: Opened,
    /// `virsh domjobinfo --completed` at the destination, as its name/value pairs (empty
    /// if libvirt did not keep them).
    pub libvirt: std::collections::BTreeMap<String, String>,
    /// Seconds `virsh migrate` ran.
    pub virsh_seconds: f64,
}

/// The `virsh migrate` options that point libvirt at ferry's endpoint: a UNIX socket
/// becomes `--migrateuri unix://PATH` (libvirt has the destination QEMU listen at the same
/// path), a TCP endpoint `--migrateuri tcp://HOST:PORT`, with `--listen-address` the
/// forward's host (the destination QEMU listens there, on the same port).
pub fn migrate_uri(listen: &str, forward: Option<&str>) -> Result<Vec<String>, Usage> {
    let choice = |flag| move |source| Usage::Choice { flag, source };
    let l: Endpoint = listen.parse().map_err(choice("listen"))?;
    let f: Option<Endpoint> = forward.map(str::parse).transpose().map_err(choice("forward"))?;
    match (l, f) {
        (Endpoint::Unix(p), None) => Ok(vec!["--migrateuri".into(), format!("unix://{}", p.display())]),
        (Endpoint::Unix(p), Some(Endpoint::Unix(q))) if p == q => Ok(vec!["--migrateuri".into(), format!("unix://{}", p.display())]),
        (Endpoint::Unix(_), Some(_)) => Err(Usage::OneUnixPath),
        (Endpoint::Tcp(a), f) => {
            // An endpoint parses only with a port.
            let port = a.rsplit_once(':').map_or("", |(_, p)| p);
            let mut args = vec!["--migrateuri".into(), format!("tcp://{a}")];
            match f {
                None => {}
                Some(Endpoint::Tcp(b)) => {
                    let (host, fport) = b.rsplit_once(':').unwrap_or((&b, ""));
                    if fport != port {
                        return Err(Usage::ForwardPort { forward: b.clone(), port: port.to_string() });
                    }
                    args.extend(["--listen-address".into(), host.trim_matches(['[', ']']).to_string()]);
                }
                Some(Endpoint::Unix(_)) => return Err(Usage::MixedKinds),
            }
            Ok(args)
        }
    }
}

/// What `ferryctl migrate` was given, checked before anything starts: the destination
/// ferryd's peer port (`--to`, else the destination URI's host), or why the input is wrong.
pub fn migrate_inputs(a: &MigrateArgs) -> Result<String, Usage> {
    if a.ends.listen.len() > 1 {
        return Err(Usage::OneListen);
    }
    if let Some(o) = a.virsh_options.iter().find(|o| NOT_YOURS.contains(&o.split('=').next().unwrap_or(o))) {
        return Err(Usage::NotYours(o.clone()));
    }
    match (&a.ends.to, peer_of(&a.dest_uri)) {
        (Some(t), _) => Ok(t.clone()),
        (None, Some(p)) => Ok(p),
        (None, None) => Err(Usage::NoHost(a.dest_uri.clone())),
    }
}

/// `ferryctl migrate DOMAIN DEST_URI [--to PEER] [-- virsh options]`: opens the stream,
/// runs `virsh migrate --live` through it, and reports ferry's figures beside libvirt's.
/// A `virsh migrate` that fails calls the stream off and fails the command; the source
/// guest is libvirt's to keep running (it does after a failed migration).
pub fn migrate(a: &MigrateArgs, to: &str) -> Result<Migrated, CtlError> {
    let id = a.ends.id.clone().unwrap_or_else(|| dataplane::peer::new_id(&a.domain));
    let run = start(&a.ends, to, Some(id), transfer::Bar::new(false))?;
    let (id, endpoints) = run.listening()?;
    let listen = endpoints.first().ok_or(CtlError::Stream("ferryd listens nowhere"))?;
    let mut virsh = Command::new(&a.virsh);
    if let Some(c) = &a.connect {
        virsh.args(["-c", c]);
    }
    virsh.args(["migrate", &a.domain, &a.dest_uri]);
    if !a.virsh_options.iter().any(|o| o == "--live" || o == "--offline") {
        virsh.arg("--live");
    }
    virsh.args(migrate_uri(listen, a.ends.forward.as_deref())?).args(&a.virsh_options);
    log::info!("stream {id}: running {virsh:?}");
    eprintln!("ferry migrate {}: stream {id} at {listen}, forwarded by the ferryd at {to}", a.domain);
    let t = std::time::Instant::now();
    let status = virsh.status().map_err(|e| {
        run.cancel();
        CtlError::io(format!("cannot run {}", a.virsh.display()), e)
    })?;
    let virsh_seconds = t.elapsed().as_secs_f64();
    if !status.success() {
        run.cancel();
        // ferry's own reason, if it has one, beside virsh's (printed above by virsh).
        let ferry = run.done(Some(Duration::from_secs(10))).err().map(Box::new);
        return Err(CtlError::Virsh { status, ferry });
    }
    // The VMM closes its connections when the migration has completed; the stream ends
    // then, and the destination ferryd's report comes with it.
    let ferry = run.done(Some(Duration::from_secs(60))).map_err(|e| CtlError::StreamAfterVirsh(Box::new(e)))?;
    let libvirt = domjobinfo(&a.virsh, &a.dest_uri, &a.domain);
    Ok(Migrated { domain: a.domain.clone(), ferry, libvirt, virsh_seconds })
}

/// `virsh -c URI domjobinfo DOMAIN --completed` as name/value pairs (empty on failure).
fn domjobinfo(virsh: &Path, uri: &str, domain: &str) -> std::collections::BTreeMap<String, String> {
    let out = Command::new(virsh).args(["-c", uri, "domjobinfo", domain, "--completed"]).output();
    let Ok(out) = out.map_err(|e| log::warn!("virsh domjobinfo: {e}")) else { return Default::default() };
    parse_jobinfo(&String::from_utf8_lossy(&out.stdout))
}

/// `Name:   value unit` lines, the value with its unit.
pub fn parse_jobinfo(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.split_whitespace().collect::<Vec<_>>().join(" ")))
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .collect()
}

/// ferry's figures and libvirt's, for a terminal.
pub fn migrated_summary(m: &Migrated) -> String {
    let pick = |k: &str| m.libvirt.get(k).map_or("?", String::as_str);
    format!(
        "{} migrated in {:.2} s (virsh)\n{}\n  libvirt: time elapsed {}, total downtime {}, data total {}, memory bandwidth {}, iterations {}",
        m.domain,
        m.virsh_seconds,
        summary(&m.ferry),
        pick("Time elapsed"),
        pick("Total downtime"),
        pick("Data total"),
        pick("Memory bandwidth"),
        pick("Iteration"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_is_pointed_at_the_endpoint() {
        assert_eq!(migrate_uri("unix:/run/ferry/streams/a.sock", None).unwrap(), ["--migrateuri", "unix:///run/ferry/streams/a.sock"]);
        assert_eq!(
            migrate_uri("tcp:127.0.0.1:49152", Some("tcp:127.0.0.2:49152")).unwrap(),
            ["--migrateuri", "tcp://127.0.0.1:49152", "--listen-address", "127.0.0.2"]
        );
        assert_eq!(migrate_uri("tcp:[::1]:49152", Some("tcp:[::1]:49152")).unwrap()[3], "::1");
        let e = migrate_uri("tcp:127.0.0.1:49152", Some("tcp:127.0.0.2:49153")).unwrap_err();
        assert!(matches!(&e, Usage::ForwardPort { port, .. } if port == "49152"), "{e}");
        assert!(matches!(migrate_uri("unix:/a.sock", Some("unix:/b.sock")), Err(Usage::OneUnixPath)));
        assert!(matches!(migrate_uri("tcp:127.0.0.1:1", Some("unix:/b.sock")), Err(Usage::MixedKinds)));
        assert!(matches!(migrate_uri("nowhere", None), Err(Usage::Choice { flag: "listen", .. })));
    }

    #[test]
    fn the_peer_is_the_destination_uris_host() {
        assert_eq!(peer_of("qemu+ssh://root@dst.example:22/system").as_deref(), Some("dst.example:7470"));
        assert_eq!(peer_of("qemu+tcp://10.0.0.2/system").as_deref(), Some("10.0.0.2:7470"));
        assert_eq!(peer_of("qemu+tls://[fd00::2]:16514/system?no_verify=1").as_deref(), Some("[fd00::2]:7470"));
        assert_eq!(peer_of("qemu:///system"), None);
        assert_eq!(peer_of("qemu+unix:///session?socket=/run/x.sock"), None);
        assert_eq!(peer_of("dst"), None);
    }

    #[test]
    fn job_info_lines() {
        let j = parse_jobinfo("Job type:         Completed   \nTime elapsed:     608          ms\nTotal downtime:   17           ms\n\n");
        assert_eq!(j["Time elapsed"], "608 ms");
        assert_eq!(j["Total downtime"], "17 ms");
        assert_eq!(j["Job type"], "Completed");
        assert_eq!(j.len(), 3);
    }
}
