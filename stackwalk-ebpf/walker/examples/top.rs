//! `top`: the functions the machine (or one process) spends its CPU in, by samples whose
//! stack ends there ("self") and samples whose stack passes through them ("total").
//!
//! ```sh
//! cargo build --release --example top -p unwound-stackwalk
//! sudo target/release/examples/top 5          # every process, 5 seconds
//! sudo target/release/examples/top 5 PID      # one process
//! ```
//!
//! The walker hands back raw addresses; the symbolizer names them while the processes are
//! still alive (a real profiler captures each mapping when it first sees it, see the
//! `unwound` agent).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use unwound_stackwalk::{Event, WalkerBuilder};
use unwound_symbolize::process::lookup_address;
use unwound_symbolize::{Options, Symbolizer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let seconds: f64 = args.next().map_or(Ok(5.0), |s| s.parse())?;
    let pid: Option<u32> = args.next().map(|s| s.parse()).transpose()?;

    let mut builder = WalkerBuilder::new().frequency(199);
    if let Some(pid) = pid {
        builder = builder.pid(pid);
    }
    let mut walker = builder.start()?;
    for notice in walker.take_notices() {
        eprintln!("note: {notice}");
    }

    // (pid, address) → (self samples, total samples).
    let mut counts: HashMap<(u32, u64), (u64, u64)> = HashMap::new();
    let mut samples = 0u64;
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        walker.drain(Duration::from_millis(100), |event| {
            let Event::Sample(s) = event else { return };
            samples += 1;
            let mut seen = Vec::new();
            for (i, addr) in s.record.user.iter().enumerate() {
                // Return addresses point after the call: look up the call itself.
                let addr = lookup_address(i, addr);
                if seen.contains(&addr) {
                    continue; // recursion: once per sample in "total"
                }
                seen.push(addr);
                let c = counts.entry((s.pid(), addr)).or_default();
                c.0 += u64::from(i == 0);
                c.1 += 1;
            }
        })?;
    }
    walker.detach();

    // Name every address, process by process, and add up by function.
    let symbolizer = Symbolizer::new(Options::default());
    let mut by_pid: HashMap<u32, Vec<u64>> = HashMap::new();
    for &(pid, addr) in counts.keys() {
        by_pid.entry(pid).or_default().push(addr);
    }
    let mut functions: HashMap<String, (u64, u64)> = HashMap::new();
    for (pid, addrs) in by_pid {
        let names = symbolizer.symbolize_pid(pid, &addrs).unwrap_or_default();
        for (i, &addr) in addrs.iter().enumerate() {
            let name = names
                .get(i)
                .and_then(|r| r.as_ref().ok())
                .and_then(|s| s.frames.last())
                .and_then(|f| f.function.as_ref())
                .map_or_else(|| "[unknown]".to_string(), |n| n.to_string());
            let (own, total) = counts[&(pid, addr)];
            let f = functions.entry(name).or_default();
            f.0 += own;
            f.1 += total;
        }
    }
    let mut rows: Vec<_> = functions.into_iter().collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    println!("{samples} samples");
    println!("{:>7} {:>7}  function", "self%", "total%");
    let pct = |n: u64| 100.0 * n as f64 / samples.max(1) as f64;
    for (name, (own, total)) in rows.into_iter().take(25) {
        println!("{:>6.1}% {:>6.1}%  {name}", pct(own), pct(total));
    }
    Ok(())
}
