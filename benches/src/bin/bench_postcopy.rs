//! Post-copy against pre-copy on the same guest, interleaved in one run (pre-copy,
//! post-copy, pre-copy, ...): the demo's migration through two `ferryd` processes, as
//! `ferryctl bench migrate` runs it, printing one JSON line per migration and a summary
//! line per size with the medians and the ratios (post-copy / pre-copy).
//!
//!     cargo build --release && target/release/bench_postcopy [--sizes 256,1024] [--reps 1]
//!         [--dirty-rate-mbs 3000] [--pattern uniform]
//!
//! The default is the guest that never converges: uniform writes at 3000 MB/s. Pre-copy
//! runs to ferry's advice (pause: the estimate fits the budget, or the round limit);
//! post-copy switches over when ferry advises it (pause, or post-copy).

use serde_json::{Value, json};

fn main() {
    let mut sizes = vec![256u64, 1024];
    let (mut reps, mut rate, mut pattern) = (1usize, 3000.0f64, "uniform".to_string());
    let v: Vec<String> = std::env::args().skip(1).collect();
    for pair in v.chunks(2) {
        let val = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--sizes" => sizes = val.split(',').map(|s| s.parse().expect("--sizes N,N")).collect(),
            "--reps" => reps = val.parse().expect("--reps N"),
            "--dirty-rate-mbs" => rate = val.parse().expect("--dirty-rate-mbs X"),
            "--pattern" => pattern = val,
            other => panic!("unknown argument {other}"),
        }
    }
    let ferryd = std::env::current_exe().expect("own path").with_file_name("ferryd");
    for size in sizes {
        let (mut pre, mut post) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            for postcopy in [false, true] {
                let args = [
                    "ferryctl".to_string(),
                    "--size-mib".into(),
                    size.to_string(),
                    "--dirty-rate-mbs".into(),
                    rate.to_string(),
                    "--pattern".into(),
                    pattern.clone(),
                    "--ferryd".into(),
                    ferryd.display().to_string(),
                ];
                let mut a = <Cli as clap::Parser>::parse_from(args).m;
                a.postcopy = postcopy;
                let mut reports = Vec::new();
                control::demo::run(&a, &mut |_| {}, &mut |r| reports.push(r)).unwrap_or_else(|e| panic!("{e}"));
                let r = reports.pop().expect("one run, one report");
                let line = json!({
                    "size_mib": size,
                    "mode": if postcopy { "postcopy" } else { "precopy" },
                    "downtime_ms": r.downtime_ms,
                    "total_seconds": r.total_seconds,
                    "rounds": r.rounds.len(),
                    "sent_bytes": r.sent_bytes,
                    "wire_bytes": r.wire_bytes,
                    "cpu_seconds_per_gib": r.cpu_seconds_per_gib,
                    "verified": r.verified,
                    "postcopy": r.postcopy.as_ref().map(|p| serde_json::to_value(p).expect("serialises")),
                });
                println!("{line}");
                if postcopy { &mut post } else { &mut pre }.push(line);
            }
        }
        let median = |v: &[Value], k: &str| {
            let mut x: Vec<f64> = v.iter().filter_map(|l| l[k].as_f64()).collect();
            x.sort_by(f64::total_cmp);
            let n = x.len();
            if n % 2 == 1 { x[n / 2] } else { (x[n / 2 - 1] + x[n / 2]) / 2.0 }
        };
        let summary: serde_json::Map<String, Value> = ["downtime_ms", "total_seconds", "sent_bytes", "wire_bytes", "cpu_seconds_per_gib"]
            .iter()
            .map(|k| {
                let (a, b) = (median(&pre, k), median(&post, k));
                (k.to_string(), json!({"precopy": a, "postcopy": b, "ratio": b / a}))
            })
            .collect();
        println!(
            "{}",
            json!({"summary": true, "size_mib": size, "reps": reps, "dirty_rate_mbs": rate, "pattern": pattern, "medians": summary})
        );
    }
}

/// The demo's arguments, parsed as `ferryctl bench migrate` parses them.
#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    m: control::demo::MigrateArgs,
}
