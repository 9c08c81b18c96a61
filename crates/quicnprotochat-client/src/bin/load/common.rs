//! Shared pieces of the load generator: the JSON report, histogram
//! summaries, CPU time of a process, the git revision, and child processes
//! (the real server binary, the raw relay) pinned to a core.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use hdrhistogram::Histogram;
use quicnprotochat_client::ClientConfig;
use quicnprotochat_client::harness::TEST_TOKEN;
use quicnprotochat_proto::transport::{self, ServerAuth};
use serde_json::{Value, json};

/// A new histogram of microseconds (3 significant digits).
pub fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::<u64>::new(3)?)
}

/// Microseconds of a duration, saturating.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// p50, p90, p99, p99.9, max (milliseconds) and count of a µs histogram.
pub fn summary(h: &Histogram<u64>) -> Value {
    let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
    json!({
        "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99), "p999_ms": q(0.999),
        "max_ms": h.max() as f64 / 1000.0, "count": h.len(),
    })
}

/// The git revision: `QUICNPROTOCHAT_REV`, else `git rev-parse --short HEAD`.
pub fn git_rev() -> String {
    if let Ok(r) = std::env::var("QUICNPROTOCHAT_REV") {
        return r;
    }
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// The fields of `/proc/<pid>/stat` after the command name: index 0 is
/// the state, 1 the parent pid, 11 and 12 utime and stime, 13 and 14
/// cutime and cstime (the 1-based field number minus 3).
fn stat_fields(pid: &str) -> anyhow::Result<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces: fields start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))?;
    // The state is a letter: keep its slot so the indices stay put.
    Ok(rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect())
}

/// Field `i` of [`stat_fields`].
fn stat_field(f: &[u64], i: usize, pid: &str) -> anyhow::Result<u64> {
    f.get(i)
        .copied()
        .ok_or_else(|| anyhow!("short /proc/{pid}/stat"))
}

/// Ticks (USER_HZ, 100 on Linux) to µs.
const US_PER_TICK: u64 = 10_000;

/// User + system CPU time of process `pid` ("self" for this one), in µs,
/// from `/proc/<pid>/stat` (all threads).
pub fn cpu_us(pid: &str) -> anyhow::Result<u64> {
    let f = stat_fields(pid)?;
    Ok((stat_field(&f, 11, pid)? + stat_field(&f, 12, pid)?) * US_PER_TICK)
}

/// The parent of process `pid`.
pub fn ppid(pid: u32) -> anyhow::Result<u32> {
    let p = pid.to_string();
    Ok(u32::try_from(stat_field(&stat_fields(&p)?, 1, &p)?)?)
}

/// The live children of process `pid` (from every `/proc/<n>/stat`).
pub fn children(pid: u32) -> anyhow::Result<Vec<u32>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc")? {
        let Some(n) = e?.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        // A process may exit between the listing and the read.
        if let Ok(f) = stat_fields(&n.to_string())
            && f.get(1) == Some(&u64::from(pid))
        {
            out.push(n);
        }
    }
    Ok(out)
}

/// CPU µs of process `pid` and of its children: its own user + system
/// time, the time of the children it has already reaped (cutime + cstime),
/// and the time of its live children (theirs, and their reaped children's).
/// A child that exits between two readings moves from the live sum to the
/// reaped one, so the difference of two readings counts it once.
pub fn tree_cpu_us(pid: u32) -> anyhow::Result<u64> {
    let p = pid.to_string();
    let all = |f: &[u64], p: &str| -> anyhow::Result<u64> {
        [11, 12, 13, 14]
            .iter()
            .map(|&i| stat_field(f, i, p))
            .sum::<anyhow::Result<u64>>()
    };
    let mut ticks = all(&stat_fields(&p)?, &p)?;
    for c in children(pid)? {
        let cp = c.to_string();
        if let Ok(f) = stat_fields(&cp) {
            ticks += all(&f, &cp)?;
        }
    }
    Ok(ticks * US_PER_TICK)
}

/// Pins process `pid`, all its threads, and all its live children to
/// `core` (`taskset -a -p`); children it forks later inherit the pinning.
pub fn pin_tree(pid: u32, core: usize) -> anyhow::Result<()> {
    let mut pids = vec![pid];
    pids.extend(children(pid)?);
    for p in pids {
        let out = Command::new("taskset")
            .args(["-a", "-p", "-c", &core.to_string(), &p.to_string()])
            .stdin(Stdio::null())
            .output()
            .context("running taskset")?;
        // A child may have exited since the listing.
        let gone = p != pid && !Path::new(&format!("/proc/{p}")).exists();
        anyhow::ensure!(
            out.status.success() || gone,
            "taskset -p {p}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Resident set size of process `pid` in KiB (`VmRSS`).
pub fn rss_kib(pid: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(v) = line.strip_prefix("VmRSS:") {
            return Ok(v.trim().trim_end_matches("kB").trim().parse()?);
        }
    }
    bail!("no VmRSS in /proc/{pid}/status")
}

/// One scenario's report line.
#[derive(Debug)]
pub struct Report {
    /// scenario name
    pub scenario: String,
    /// parameters
    pub params: Value,
    /// our figures
    pub figures: Value,
    /// the peer's name
    pub peer: String,
    /// the peer's figures
    pub peer_figures: Value,
    /// the compared quantity's name
    pub ratio_of: String,
    /// ours / peer's
    pub ratio: Option<f64>,
    /// the target, in words
    pub target: String,
    /// whether the target is met (None: no target)
    pub pass: Option<bool>,
    /// CPU µs per operation: ours, then the peer's
    pub cpu_us_per_op: Value,
}

impl Report {
    /// Prints the JSON line and returns it.
    pub fn emit(&self) -> Value {
        let v = json!({
            "scenario": self.scenario,
            "rev": git_rev(),
            "unix_time": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            "params": self.params,
            "figures": self.figures,
            "peer": self.peer,
            "peer_figures": self.peer_figures,
            "ratio_of": self.ratio_of,
            "ratio": self.ratio,
            "target": self.target,
            "pass": self.pass,
            "cpu_us_per_op": self.cpu_us_per_op,
        });
        println!("{v}");
        v
    }
}

/// Where the server binary is: `--server-bin`, else beside this executable.
pub fn server_bin(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let me = std::env::current_exe()?;
    let dir = me
        .parent()
        .ok_or_else(|| anyhow!("no executable directory"))?;
    let p = dir.join("quicnprotochat-server");
    anyhow::ensure!(
        p.exists(),
        "{} is missing: build it (cargo build --release -p quicnprotochat-server) or pass --server-bin",
        p.display()
    );
    Ok(p)
}

/// A child process (server or relay) on loopback, killed on drop.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    /// its address
    pub addr: SocketAddr,
    /// its certificate fingerprint
    pub fingerprint: [u8; 32],
    /// exec to the `listening` line on stderr
    pub startup: Duration,
    /// when the `listening` line arrived
    listening_at: Instant,
    /// its temporary directory (removed on drop)
    _dir: tempfile::TempDir,
}

impl Proc {
    /// The process id, as a /proc path component.
    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// CPU µs of the process so far.
    pub fn cpu_us(&self) -> anyhow::Result<u64> {
        cpu_us(&self.pid())
    }

    /// Time since the `listening` line arrived.
    pub fn since_listening(&self) -> Duration {
        self.listening_at.elapsed()
    }

    /// Resident set size of the process in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        rss_kib(&self.pid())
    }

    /// Stops the process with SIGTERM (a server drains and closes its
    /// store) and waits up to 30 s for it to exit.
    pub fn terminate(&mut self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args(["-s", "TERM", &self.pid()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -s TERM failed: {status}");
        for _ in 0..3000 {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("the process did not exit within 30 s of SIGTERM")
    }

    /// A client configuration pinning this server.
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig::new(self.addr, ServerAuth::Pinned(self.fingerprint), TEST_TOKEN)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cmd` (prefixed with `taskset -c core` when `core` is given) and
/// waits for a stderr line with `listening` and `addr=`; reads the
/// fingerprint from `fp=` on that line or from `cert`.
fn start(
    program: &Path,
    args: &[String],
    envs: &[(&str, String)],
    core: Option<usize>,
    dir: tempfile::TempDir,
    cert: Option<PathBuf>,
) -> anyhow::Result<Proc> {
    let mut cmd = match core {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(c.to_string()).arg(program);
            cmd
        }
        None => Command::new(program),
    };
    cmd.args(args).env_clear();
    for (k, v) in envs {
        cmd.env(k, v);
    }
    if std::env::var_os("QUICNPROTOCHAT_LOAD_LOG").is_some()
        && let Some(filter) = std::env::var_os("RUST_LOG")
    {
        cmd.env("RUST_LOG", filter);
    }
    let t0 = Instant::now();
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow!("no stderr of the child"))?;
    let (tx, rx) = std::sync::mpsc::channel::<(String, Instant)>();
    // QUICNPROTOCHAT_LOAD_LOG=FILE keeps the children's log lines (with
    // RUST_LOG passed on to them), for finding why a run failed.
    let mut keep = match std::env::var_os("QUICNPROTOCHAT_LOAD_LOG") {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.to_string_lossy()))?,
        ),
        None => None,
    };
    std::thread::spawn(move || {
        // Drains stderr until the child exits (so it never blocks on a full pipe).
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(f) = keep.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            if line.contains("listening") && line.contains("addr=") {
                let _ = tx.send((line, Instant::now()));
            }
        }
    });
    let (line, at) = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(v) => v,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{} did not report its address", program.display());
        }
    };
    let field = |name: &str| -> Option<String> {
        line.split(name)
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .map(|s| s.trim_matches('"').to_string())
    };
    let mut proc = Proc {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        fingerprint: [0; 32],
        startup: at.duration_since(t0),
        listening_at: at,
        _dir: dir,
    };
    proc.addr = field("addr=")
        .ok_or_else(|| anyhow!("no address in {line:?}"))?
        .parse()
        .with_context(|| format!("address in {line:?}"))?;
    if let Some(fp) = field("fp=") {
        let bytes = hex::decode(fp)?;
        proc.fingerprint = bytes
            .try_into()
            .map_err(|_| anyhow!("bad fingerprint length"))?;
    } else if let Some(cert) = cert {
        use quicnprotochat_proto::rustls::pki_types::CertificateDer;
        use quicnprotochat_proto::rustls::pki_types::pem::PemObject as _;
        let c = CertificateDer::from_pem_file(&cert)
            .map_err(|e| anyhow!("reading {}: {e}", cert.display()))?;
        proc.fingerprint = transport::fingerprint(&c);
    }
    Ok(proc)
}

/// Configuration file of benchmark servers: limits raised out of the way.
pub const BENCH_SERVER_TOML: &str = r#"
[limits]
queue_depth = 10000000
max_connections = 20000
max_connections_per_ip = 20000
idle_timeout_secs = 600

[limits.rates]
auth_per_ip = { per_second = 1000000, burst = 1000000 }
enqueue_per_identity = { per_second = 1000000, burst = 1000000 }
enqueue_per_ip = { per_second = 1000000, burst = 1000000 }
key_package_fetch_per_identity = { per_second = 1000000, burst = 1000000 }
key_package_fetch_per_ip = { per_second = 1000000, burst = 1000000 }
"#;

/// Starts the real server binary on a free loopback port with its data
/// directory in a new temporary directory (or in `data_dir`, kept).
pub fn start_server(
    bin: &Path,
    core: Option<usize>,
    data_dir: Option<&Path>,
) -> anyhow::Result<Proc> {
    start_server_with(bin, core, data_dir, &[])
}

/// [`start_server`] with extra flags (e.g. `--db-key ""`: no encryption).
pub fn start_server_with(
    bin: &Path,
    core: Option<usize>,
    data_dir: Option<&Path>,
    extra: &[&str],
) -> anyhow::Result<Proc> {
    start_server_configured(bin, core, data_dir, extra, BENCH_SERVER_TOML)
}

/// [`start_server_with`] with the configuration file `toml`.
pub fn start_server_configured(
    bin: &Path,
    core: Option<usize>,
    data_dir: Option<&Path>,
    extra: &[&str],
    toml: &str,
) -> anyhow::Result<Proc> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("server.toml");
    std::fs::write(&config, toml)?;
    let data = data_dir.map_or_else(|| dir.path().join("data"), Path::to_path_buf);
    let mut args = vec![
        "serve".to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--config".into(),
        config.display().to_string(),
        "--data-dir".into(),
        data.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let envs = [
        ("QUICNPROTOCHAT_AUTH_TOKEN", TEST_TOKEN.to_string()),
        ("RUST_LOG", "info".to_string()),
    ];
    let cert = data.join("dev-cert.pem");
    start(bin, &args, &envs, core, dir, Some(cert))
}

/// Starts the raw relay (this executable, hidden `relay-serve` subcommand).
pub fn start_relay(core: Option<usize>, max_secs: u64) -> anyhow::Result<Proc> {
    let me = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;
    let args = vec![
        "relay-serve".to_string(),
        "--max-secs".into(),
        max_secs.to_string(),
    ];
    start(&me, &args, &[], core, dir, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_tree_costs_at_least_its_root() {
        let me = std::process::id();
        let own = cpu_us(&me.to_string()).unwrap();
        assert!(tree_cpu_us(me).unwrap() >= own);
        assert_eq!(ppid(me).unwrap(), std::os::unix::process::parent_id());
    }

    #[test]
    fn children_are_found_and_counted() {
        let mut child = Command::new("sleep").arg("5").spawn().unwrap();
        let me = std::process::id();
        let found = children(me).unwrap().contains(&child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(found);
    }
}
