//! What the kernel says about a process (and its descendants): CPU time, RSS, open files.
//!
//! CPU comes from `/proc/<pid>/stat` (utime + stime, plus cutime + cstime of reaped children),
//! so the figure is the proxy's own, whatever the load generator on the same cores does.

use std::fs;
use std::process::Command;

/// Clock ticks per second for the `stat` times (`getconf CLK_TCK`; 100 on every Linux we know).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|&t| t > 0.0)
        .unwrap_or(100.0)
}

/// The fields of `/proc/<pid>/stat` after the command name (field 3 onwards).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = text.rsplit_once(')')?.1;
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// `pid` and every live descendant.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = stat_fields(child)
                .and_then(|f| f.get(1).cloned())
                .and_then(|s| s.parse::<u32>().ok())
            {
                parents.push((child, ppid));
            }
        }
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        for &(child, ppid) in &parents {
            if ppid == parent && !found.contains(&child) {
                found.push(child);
            }
        }
        i += 1;
    }
    found
}

/// CPU seconds (user + system, with reaped children) used so far by `pid` and its descendants.
pub fn cpu_seconds(pid: u32, ticks: f64) -> f64 {
    let (user, system) = cpu_split(pid, ticks);
    user + system
}

/// CPU seconds used so far by `pid` and its descendants, as (user, system): utime + cutime
/// and stime + cstime, fields 14-17 of `stat`, i.e. 11-14 after the name.
pub fn cpu_split(pid: u32, ticks: f64) -> (f64, f64) {
    let field = |f: &[String], i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok());
    let (user, system) = tree(pid)
        .into_iter()
        .filter_map(stat_fields)
        .map(|f| {
            let user = field(&f, 11).unwrap_or(0.0) + field(&f, 13).unwrap_or(0.0);
            let system = field(&f, 12).unwrap_or(0.0) + field(&f, 14).unwrap_or(0.0);
            (user, system)
        })
        .fold((0.0, 0.0), |(u, s), (du, ds)| (u + du, s + ds));
    (user / ticks, system / ticks)
}

/// System (kernel) CPU seconds of `pid` alone, children not included.
pub fn system_seconds(pid: u32, ticks: f64) -> f64 {
    stat_fields(pid)
        .and_then(|f| f.get(12).and_then(|s| s.parse::<f64>().ok()))
        .unwrap_or(0.0)
        / ticks
}

/// Nanoseconds `pid` and its descendants have run so far, summed over their threads from
/// `/proc/<pid>/task/<tid>/schedstat` (first field). Finer than `stat`'s clock ticks (10 ms),
/// which a batch of sub-millisecond requests would round to nothing; it counts live threads
/// only, so a thread that exits inside a window takes its time with it.
pub fn run_ns(pid: u32) -> u64 {
    sched_tree(pid).run_ns
}

/// What the scheduler says of a group of threads (`/proc/<pid>/task/<tid>/schedstat`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Sched {
    /// Nanoseconds run on a CPU.
    pub run_ns: u64,
    /// Nanoseconds runnable but waiting for a CPU (the cores were busy with something else).
    pub wait_ns: u64,
    /// Times a thread was put on a CPU: about one per wake-up.
    pub slices: u64,
}

impl Sched {
    /// `self - earlier`, field by field.
    pub fn since(self, earlier: Sched) -> Sched {
        Sched {
            run_ns: self.run_ns.saturating_sub(earlier.run_ns),
            wait_ns: self.wait_ns.saturating_sub(earlier.wait_ns),
            slices: self.slices.saturating_sub(earlier.slices),
        }
    }
}

/// All three `schedstat` fields summed over the live threads of `pids`.
fn sched_of(pids: impl IntoIterator<Item = u32>) -> Sched {
    pids.into_iter()
        .filter_map(|p| fs::read_dir(format!("/proc/{p}/task")).ok())
        .flat_map(|tasks| tasks.flatten())
        .filter_map(|task| fs::read_to_string(task.path().join("schedstat")).ok())
        .fold(Sched::default(), |sum, text| {
            let mut fields = text
                .split_whitespace()
                .map(|f| f.parse::<u64>().unwrap_or(0));
            let mut next = || fields.next().unwrap_or(0);
            Sched {
                run_ns: sum.run_ns + next(),
                wait_ns: sum.wait_ns + next(),
                slices: sum.slices + next(),
            }
        })
}

/// [`Sched`] of `pid` and its descendants (a proxy and its helpers or worker processes).
pub fn sched_tree(pid: u32) -> Sched {
    sched_of(tree(pid))
}

/// [`Sched`] of `pid`'s own threads: for the load generator, whose children are the origin
/// and the peers.
pub fn sched_own(pid: u32) -> Sched {
    sched_of([pid])
}

/// CPU seconds the whole machine has been busy (user, nice, system, irq, softirq from the
/// first line of `/proc/stat`): every process, this benchmark's or not. `/proc/stat` is not
/// per namespace, so this sees anything else the machine runs. Then the seconds stolen: a
/// virtual CPU wanted to run and the host ran something else.
pub fn machine_seconds(ticks: f64) -> (f64, f64) {
    let text = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return (f64::NAN, f64::NAN);
    };
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: f64 = [0, 1, 2, 5, 6].iter().filter_map(|&i| fields.get(i)).sum();
    let steal = fields.get(7).copied().unwrap_or(0.0);
    (busy / ticks, steal / ticks)
}

/// Resident set size in KiB (`VmRSS`), summed over `pid` and its descendants.
pub fn rss_kib(pid: u32) -> u64 {
    tree(pid)
        .into_iter()
        .filter_map(|p| fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .sum()
}

/// Open file descriptors of `pid` and its descendants.
pub fn fd_count(pid: u32) -> usize {
    tree(pid)
        .into_iter()
        .filter_map(|p| fs::read_dir(format!("/proc/{p}/fd")).ok())
        .map(|dir| dir.count())
        .sum()
}

/// The soft `RLIMIT_NOFILE` of a process (`"self"` for this one).
pub fn nofile_limit(pid: &str) -> Option<u64> {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The first line of a command's output (version strings for the report).
pub fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|out| {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

/// The machine, as the report names it.
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory: String,
    pub kernel: String,
    pub os: String,
}

pub fn machine() -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or_else(
            || "unknown".into(),
            |kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0),
        );
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let os = fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_default();
    Machine {
        cpu,
        cores,
        memory,
        kernel,
        os,
    }
}
