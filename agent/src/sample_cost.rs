//! `unwound sample-cost`: the kernel time every `cpu-clock` sample costs on this machine,
//! whichever profiler takes it (see `unwound_stackwalk::sample_cost` for how it is
//! measured).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;
use unwound_stackwalk::sample_cost::{SampleCost, SampleCostTotals};

use crate::record::stop_on_signals;

#[derive(clap::Args, Debug)]
pub struct SampleCostArgs {
    /// How long to measure, in seconds (Ctrl-C stops early).
    #[arg(short, long, default_value_t = 10.0, value_name = "SECONDS", value_parser = crate::positive_seconds)]
    pub duration: f64,
    /// Print the totals as one JSON object (`samples`, `kernel_ns`, `ns_per_sample`,
    /// `seconds`) per line on stdout: at the end, and on each SIGUSR1.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &SampleCostArgs) -> anyhow::Result<()> {
    let cost = SampleCost::start()?;
    let stop = stop_on_signals()?;
    let snapshot = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, Arc::clone(&snapshot))
        .context("cannot install signal handler")?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.duration);
    eprintln!(
        "unwound: timing every cpu-clock sample's kernel work for {:.1} s (Ctrl-C stops early, SIGUSR1 prints the totals so far)",
        args.duration
    );
    let report = |t: SampleCostTotals, seconds: f64| {
        let SampleCostTotals { samples, kernel_ns: total } = t;
        let per = if samples > 0 { total as f64 / samples as f64 } else { 0.0 };
        eprintln!(
            "unwound: {samples} cpu-clock samples in {seconds:.2} s took {:.4} s of kernel time ({per:.0} ns per sample)",
            total as f64 / 1e9
        );
        if args.json {
            let totals = json!({
                "samples": samples,
                "kernel_ns": total,
                "ns_per_sample": crate::rounded(per, 1),
                "seconds": crate::rounded(seconds, 3),
            });
            println!("{totals}");
        }
    };
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20).min(deadline.saturating_duration_since(Instant::now())));
        if snapshot.swap(false, Ordering::Relaxed) {
            report(cost.totals()?, started.elapsed().as_secs_f64());
        }
    }
    report(cost.totals()?, started.elapsed().as_secs_f64());
    Ok(())
}
