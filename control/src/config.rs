//! ferry's one config file (TOML). Every tunable is `"auto"` (the planner decides) or a
//! pinned value; every fallback can be forced. Unknown fields and out-of-range values are
//! errors that name the field and its line. `deploy/ferry.toml` documents every field.

use std::fmt;
use std::marker::PhantomData;
use std::path::Path;

use std::path::PathBuf;

use serde::Deserialize;
use serde::de::{self, Deserializer, IntoDeserializer, Visitor};

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub dataplane: DataplaneConfig,
    pub rdma: RdmaConfig,
    pub tcp: TcpConfig,
    pub link: LinkConfig,
    pub migration: MigrationConfig,
    pub daemon: DaemonConfig,
    pub limits: LimitsConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataplaneConfig {
    pub transport: TransportChoice,
    pub workers: Setting<Int<1, 1024>>,
    pub cpus: Setting<Vec<u32>>,
    pub numa_node: Setting<Int<0, 1023>>,
    pub chunk_size_kib: Setting<Int<4, 65536>>,
    pub arena_mib_per_worker: Setting<Int<2, 65536>>,
    pub hugepages: HugepagePolicy,
    pub mlock: bool,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        Self {
            transport: TransportChoice::Auto,
            workers: Setting::Auto,
            cpus: Setting::Auto,
            numa_node: Setting::Auto,
            chunk_size_kib: Setting::Auto,
            arena_mib_per_worker: Setting::Auto,
            hugepages: HugepagePolicy::Auto,
            mlock: true,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RdmaConfig {
    pub device: Setting<String>,
    pub port: Setting<Int<1, 255>>,
    pub gid_index: Setting<Int<0, 65535>>,
    pub qps_per_worker: Setting<Int<1, 64>>,
    pub sq_depth: Setting<Int<1, 1_048_576>>,
    pub rq_depth: Setting<Int<1, 1_048_576>>,
    pub cq_depth: Setting<Int<2, 16_777_216>>,
    pub send_sge: Setting<Int<1, 64>>,
    pub recv_sge: Setting<Int<1, 64>>,
    pub inline_threshold_bytes: Setting<Int<0, 4096>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpConfig {
    pub connections_per_worker: Setting<Int<1, 64>>,
    pub ring_entries: Setting<Int<8, 32768>>,
    pub send_zc: Switch,
    pub socket_buffer_kib: Setting<Int<64, 1_048_576>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinkConfig {
    /// The netdev the data plane uses for TCP.
    pub interface: Setting<String>,
    pub speed_gbps: Setting<Int<1, 3200>>,
    pub rtt_us: Setting<Int<1, 1_000_000>>,
}

/// What migrations use where a VMM's request names nothing (see
/// [`dataplane::plan::MigrationDefaults`]); a request's own value wins.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationConfig {
    pub compression: CompressionChoice,
    pub downtime_ms: Int<1, 600_000>,
    pub max_rounds: Int<1, 10_000>,
    /// `"off"` or Mbit/s.
    pub rate_limit_mbit: OffOr<Int<1, 100_000_000>>,
    pub verify: dataplane::migrate::Verify,
    pub recover_s: Int<1, 86_400>,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        let d = dataplane::plan::MigrationDefaults::default();
        Self {
            compression: CompressionChoice::Auto,
            downtime_ms: Int(d.downtime_ms),
            max_rounds: Int(u64::from(d.max_rounds)),
            rate_limit_mbit: OffOr::Off,
            verify: d.verify,
            recover_s: Int(d.recover_s),
        }
    }
}

/// How ferryd serves (see [`dataplane::plan::DaemonSettings`]); its flags win.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    pub control: PathBuf,
    /// Octal, `"0600"` or `"0660"`.
    pub control_mode: String,
    /// A group name or number; `""`: the owner's.
    pub control_group: String,
    /// `"HOST:PORT"` or `"off"`.
    pub metrics: String,
    /// `""`: none (ferryd must be given `--key` or `--insecure-no-auth`).
    pub key: PathBuf,
    pub drain_seconds: Int<1, 3600>,
    /// `"any"` or `"FIRST-LAST"`.
    pub incoming_ports: PortRange,
    /// `"HOST:PORT"` where other ferryd open streams here, or `"off"`.
    pub peer: String,
    /// Directories stream channels may be forwarded into (the first: where streams
    /// opened here listen by default).
    pub stream_dirs: Vec<PathBuf>,
    /// Octal, `"0600"` or `"0660"`: the stream endpoints' UNIX sockets.
    pub stream_mode: String,
    /// A group name or number; `""`: the owner's.
    pub stream_group: String,
    pub stream_idle_s: Int<1, 86400>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        let d = dataplane::plan::DaemonSettings::default();
        Self {
            control: d.control,
            control_mode: d.control_mode,
            control_group: String::new(),
            metrics: d.metrics,
            key: PathBuf::new(),
            drain_seconds: Int(d.drain_seconds),
            incoming_ports: PortRange::Any,
            peer: "off".into(),
            stream_dirs: d.stream_dirs,
            stream_mode: d.stream_mode,
            stream_group: String::new(),
            stream_idle_s: Int(d.stream_idle_s),
        }
    }
}

impl DaemonConfig {
    /// What ferryd would refuse at start, refused here (by `tune` and `doctor`) instead.
    fn check(&self) -> Result<(), ConfigInvalid> {
        let mode = |field, m: &str| {
            dataplane::daemon::SocketAccess::parse(m, None).map(drop).map_err(|source| ConfigInvalid::Mode { field, source })
        };
        mode("control_mode", &self.control_mode)?;
        for (field, value) in [("metrics", &self.metrics), ("peer", &self.peer)] {
            if value != "off" && value.parse::<std::net::SocketAddr>().is_err() {
                return Err(ConfigInvalid::Address { field, value: value.clone() });
            }
        }
        mode("stream_mode", &self.stream_mode)?;
        if self.stream_dirs.is_empty() || self.stream_dirs.iter().any(|d| !d.is_absolute()) {
            return Err(ConfigInvalid::StreamDirs);
        }
        Ok(())
    }
}

/// `"off"` or a value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum OffOr<T> {
    #[default]
    Off,
    Set(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OffOr<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Through a TOML value: "off" is a word here, "auto" is not.
        match toml::Value::deserialize(d)? {
            toml::Value::String(s) if s == "off" => Ok(OffOr::Off),
            toml::Value::String(s) => Err(de::Error::custom(format!("\"{s}\": give \"off\" or a number"))),
            v => T::deserialize(v).map(OffOr::Set).map_err(de::Error::custom),
        }
    }
}

/// `"any"` or `"FIRST-LAST"` (ports, inclusive).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PortRange {
    #[default]
    Any,
    Range(u16, u16),
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "any" {
            return Ok(PortRange::Any);
        }
        let bad = || de::Error::custom(format!("\"{s}\" is not a port range: give \"any\" or \"FIRST-LAST\" (1-65535)"));
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let (a, b) = (a.trim().parse::<u16>().map_err(|_| bad())?, b.trim().parse::<u16>().map_err(|_| bad())?);
        if a == 0 || a > b {
            return Err(bad());
        }
        Ok(PortRange::Range(a, b))
    }
}

/// What strangers, peers and local clients may cost this host (see
/// [`dataplane::plan::Limits`] for what each bounds).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub preauth_connections: Int<1, 4096>,
    pub preauth_bytes: Int<512, 1_048_576>,
    pub handshake_timeout_ms: Int<100, 600_000>,
    /// `"auto"`: what the host can back when a session starts.
    pub max_region_gib: Setting<Int<1, 1_048_576>>,
    pub max_lanes: Int<1, 4096>,
    pub session_buffer_mib: Int<16, 1_048_576>,
    pub control_clients: Int<1, 4096>,
    pub control_fds_per_message: Int<1, 253>,
    pub metrics_clients: Int<1, 4096>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let d = dataplane::plan::Limits::default();
        Self {
            preauth_connections: Int(u64::from(d.preauth_connections)),
            preauth_bytes: Int(d.preauth_bytes),
            handshake_timeout_ms: Int(d.handshake_timeout_ms),
            max_region_gib: Setting::Auto,
            max_lanes: Int(u64::from(d.max_lanes)),
            session_buffer_mib: Int(d.session_buffer_bytes >> 20),
            control_clients: Int(u64::from(d.control_clients)),
            control_fds_per_message: Int(u64::from(d.control_fds_per_message)),
            metrics_clients: Int(u64::from(d.metrics_clients)),
        }
    }
}

/// `"auto"` or a pinned value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Setting<T> {
    #[default]
    Auto,
    Set(T),
}

impl<T: Clone> Setting<T> {
    pub fn get(&self) -> Option<T> {
        match self {
            Setting::Auto => None,
            Setting::Set(v) => Some(v.clone()),
        }
    }
}

impl<const MIN: u64, const MAX: u64> Setting<Int<MIN, MAX>> {
    pub fn value(&self) -> Option<u64> {
        self.get().map(|i| i.0)
    }
}

/// Deserialises `"auto"` to [`Setting::Auto`] and anything else through `T`, so `T`'s own
/// error (a range, a type) reaches the user with the field's line.
impl<'de, T: Deserialize<'de>> Deserialize<'de> for Setting<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Setting<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"auto\" or a value")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                if s == "auto" {
                    return Ok(Setting::Auto);
                }
                T::deserialize(s.into_deserializer()).map(Setting::Set)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                T::deserialize(v.into_deserializer()).map(Setting::Set)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                T::deserialize(v.into_deserializer()).map(Setting::Set)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                T::deserialize(v.into_deserializer()).map(Setting::Set)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                T::deserialize(v.into_deserializer()).map(Setting::Set)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(Setting::Set)
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// An integer checked against `MIN..=MAX` while parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Int<const MIN: u64, const MAX: u64>(pub u64);

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Int<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        match u64::try_from(v) {
            Ok(u) if (MIN..=MAX).contains(&u) => Ok(Int(u)),
            _ => Err(de::Error::custom(format!("{v} is out of range: must be \"auto\" or between {MIN} and {MAX}"))),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// RDMA, else io_uring TCP, else plain sockets.
    #[default]
    Auto,
    Rdma,
    /// TCP over io_uring.
    Tcp,
    /// TCP over plain sockets.
    Sockets,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HugepagePolicy {
    /// Reserved 2 MiB pages if enough are free on the node, else THP, else normal pages.
    #[default]
    Auto,
    /// Reserved 2 MiB pages or nothing (doctor fails when too few are free).
    Require,
    /// Transparent hugepages only.
    Thp,
    /// Normal pages.
    Off,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    #[default]
    Auto,
    On,
    Off,
}

/// `"auto"`, `"off"` or `"zstd:<1..=19>"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CompressionChoice {
    #[default]
    Auto,
    Off,
    Zstd(i32),
}

impl std::str::FromStr for CompressionChoice {
    type Err = dataplane::BadChoice;
    fn from_str(s: &str) -> Result<Self, dataplane::BadChoice> {
        match s {
            "auto" => Ok(Self::Auto),
            "off" => Ok(Self::Off),
            "zstd" => Ok(Self::Zstd(1)),
            _ => match s.strip_prefix("zstd:").map(str::parse::<i32>) {
                Some(Ok(l)) if (1..=19).contains(&l) => Ok(Self::Zstd(l)),
                _ => Err(dataplane::BadChoice { what: "compression", got: s.into(), choices: "auto, off or zstd:<1-19>" }),
            },
        }
    }
}

impl<'de> Deserialize<'de> for CompressionChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// Why a config file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config {path}: {source}")]
    Parse { path: String, source: ConfigInvalid },
}

/// What is wrong in a config's text.
#[derive(Debug, thiserror::Error)]
pub enum ConfigInvalid {
    /// TOML that does not parse, or an unknown or mistyped field (the line and the field).
    #[error("{}", .0.to_string().trim_end())]
    Toml(#[from] toml::de::Error),
    #[error("[daemon] {field}: {source}")]
    Mode { field: &'static str, source: dataplane::daemon::AccessError },
    #[error("[daemon] {field} = \"{value}\": give HOST:PORT (an IP address and a port) or \"off\"")]
    Address { field: &'static str, value: String },
    #[error("[daemon] stream_dirs: give one or more absolute directories")]
    StreamDirs,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: p.clone(), source })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse { path: p, source })
    }

    /// Parses TOML text; the error names the line and the field.
    pub fn parse(text: &str) -> Result<Config, ConfigInvalid> {
        let c: Config = toml::from_str(text)?;
        c.daemon.check()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_all_auto() {
        let c = Config::parse("").unwrap();
        assert_eq!(c, Config::default());
        assert!(c.dataplane.mlock);
    }

    #[test]
    fn pinned_values() {
        let c = Config::parse(
            "[dataplane]\ntransport = \"sockets\"\ncpus = [2, 3]\nworkers = 2\nhugepages = \"require\"\n\
             [rdma]\nsq_depth = \"auto\"\nrq_depth = 256\ndevice = \"mlx5_1\"\n\
             [migration]\ncompression = \"zstd:3\"\n",
        )
        .unwrap();
        assert_eq!(c.dataplane.transport, TransportChoice::Sockets);
        assert_eq!(c.dataplane.cpus, Setting::Set(vec![2, 3]));
        assert_eq!(c.dataplane.workers.value(), Some(2));
        assert_eq!(c.rdma.sq_depth, Setting::Auto);
        assert_eq!(c.rdma.rq_depth.value(), Some(256));
        assert_eq!(c.rdma.device.get().as_deref(), Some("mlx5_1"));
        assert_eq!(c.migration.compression, CompressionChoice::Zstd(3));
    }

    #[test]
    fn migration_and_daemon() {
        let c = Config::parse(
            "[migration]\ndowntime_ms = 50\nmax_rounds = 8\nrate_limit_mbit = 2000\nverify = \"full\"\n\
             [daemon]\ncontrol_mode = \"0660\"\ncontrol_group = \"kvm\"\nkey = \"/etc/ferry/ferry.key\"\nincoming_ports = \"49152-49215\"\n",
        )
        .unwrap();
        assert_eq!(c.migration.downtime_ms, Int(50));
        assert_eq!(c.migration.rate_limit_mbit, OffOr::Set(Int(2000)));
        assert_eq!(c.migration.verify, dataplane::migrate::Verify::Full);
        assert_eq!(c.migration.recover_s, MigrationConfig::default().recover_s);
        assert_eq!(c.daemon.incoming_ports, PortRange::Range(49152, 49215));
        assert_eq!(c.daemon.metrics, "127.0.0.1:9464");
        assert_eq!(c.daemon.peer, "off", "not served unless configured");
        let c = Config::parse(
            "[daemon]\npeer = \"0.0.0.0:7470\"\nstream_dirs = [\"/run/ferry/streams\", \"/var/run/kubevirt\"]\nstream_mode = \"0660\"\nstream_group = \"kvm\"\nstream_idle_s = 60\n",
        )
        .unwrap();
        let d = crate::planner::daemon_of(&c);
        assert_eq!(d.peer.as_deref(), Some("0.0.0.0:7470"));
        assert_eq!(d.stream_dirs.len(), 2);
        assert_eq!((d.stream_mode.as_str(), d.stream_group.as_deref(), d.stream_idle_s), ("0660", Some("kvm"), 60));
        for (bad, says) in [
            ("[migration]\nrate_limit_mbit = \"auto\"\n", "give \"off\" or a number"),
            ("[migration]\nrate_limit_mbit = 0\n", "between 1 and"),
            ("[migration]\nverify = \"most\"\n", "unknown variant"),
            ("[daemon]\nincoming_ports = \"9000-8000\"\n", "not a port range"),
            ("[daemon]\nmetrcs = \"off\"\n", "unknown field"),
            ("[daemon]\ncontrol_mode = \"0666\"\n", "only owner and group bits"),
            ("[daemon]\nmetrics = \"localhost\"\n", "give HOST:PORT"),
            ("[daemon]\npeer = \"dsthost\"\n", "[daemon] peer"),
            ("[daemon]\nstream_mode = \"0644\"\n", "stream_mode: mode 0644"),
            ("[daemon]\nstream_dirs = [\"streams\"]\n", "absolute directories"),
            ("[daemon]\nstream_dirs = []\n", "absolute directories"),
            ("[daemon]\nstream_idle_s = 0\n", "between 1 and"),
        ] {
            let e = Config::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn limits() {
        let c = Config::parse("[limits]\npreauth_connections = 4\nmax_region_gib = 64\n").unwrap();
        assert_eq!(c.limits.preauth_connections, Int(4));
        assert_eq!(c.limits.max_region_gib.value(), Some(64));
        assert_eq!(c.limits.max_lanes, LimitsConfig::default().max_lanes);
        let e = Config::parse("[limits]\ncontrol_fds_per_message = 300\n").unwrap_err().to_string();
        assert!(e.contains("between 1 and 253"), "{e}");
        let e = Config::parse("[limits]\npreauth_conections = 4\n").unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn unknown_field_names_field_and_line() {
        let e = Config::parse("[rdma]\nsq_depth = 128\nsq_dept = 64\n").unwrap_err().to_string();
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("unknown field `sq_dept`"), "{e}");
    }

    #[test]
    fn out_of_range_names_line() {
        let e = Config::parse("[tcp]\n\nring_entries = 4\n").unwrap_err().to_string();
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("between 8 and 32768"), "{e}");
        let e = Config::parse("[dataplane]\nworkers = -1\n").unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
    }

    #[test]
    fn bad_enum_and_compression() {
        let e = Config::parse("[dataplane]\ntransport = \"carrier-pigeon\"\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("carrier-pigeon"), "{e}");
        let e = Config::parse("[migration]\ncompression = \"zstd:40\"\n").unwrap_err().to_string();
        assert!(e.contains("zstd:<1-19>"), "{e}");
        let e = Config::parse("[dataplane]\nworkers = \"many\"\n").unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}
