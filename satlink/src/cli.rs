//! The `tiandi-satlink` command line: `up` builds a topology and runs the emulator; `cut`,
//! `restore`, `set` and `status` talk to a running one over its control socket.

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use crate::{Shape, Spec, Topology, control};

#[derive(Parser)]
#[command(
    name = "tiandi-satlink",
    version,
    about = "Satellite-link emulator (user-space netem over TAP devices)"
)]
pub struct Cli {
    /// Namespace prefix of the topology (namespaces PREFIX-hub, PREFIX-ctl, PREFIX-s1..).
    #[arg(long, global = true, default_value = "tds")]
    pub prefix: String,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Build the topology and run the emulator until interrupted, then remove everything.
    Up(UpArgs),
    /// Outage: drop everything on LINK (s1, s2, ...: the sites' links; s1b, s2b, ...: their
    /// second links, with `up --second`).
    Cut {
        #[arg(value_name = "LINK")]
        site: String,
    },
    /// End LINK's outage.
    Restore {
        #[arg(value_name = "LINK")]
        site: String,
    },
    /// Change LINK's shaping live, e.g. `set s1 loss_pct=5 rate_mbit=2` (rain fade), or
    /// `set s1b loss_pct=5` for site 1's second link.
    ///
    /// Keys: rate_kbit, rate_mbit, delay_ms, jitter_ms, loss_pct (or loss), reorder_pct,
    /// displace_pct, displace_ms, dup_pct (or duplicate_pct), corrupt_pct, queue_kb,
    /// queue_bytes. Every key takes an up_ or down_ prefix to apply to one direction only
    /// (up_rate_mbit=1, down_dup_pct=0.5).
    Set {
        #[arg(value_name = "LINK")]
        site: String,
        #[arg(required = true)]
        settings: Vec<String>,
    },
    /// Every link's shaping and counters (JSON).
    Status,
    /// Remove the namespaces of a topology left behind by a killed emulator.
    Down,
}

/// How `up` builds the topology: the sites, their network and each link's shaping.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    #[arg(long, default_value_t = 1)]
    pub sites: usize,
    /// First three octets of the /24: controller .1, site i at .(10+i).
    #[arg(long, default_value = "10.200.0")]
    pub net: String,
    /// Hub-to-site rate (Mbit/s, Ethernet frames; 0 = unlimited).
    #[arg(long, default_value_t = 20.0)]
    pub rate_mbit: f64,
    /// Site-to-hub rate (default: the same as --rate-mbit).
    #[arg(long)]
    pub up_rate_mbit: Option<f64>,
    /// One-way delay (ms).
    #[arg(long, default_value_t = 300.0)]
    pub delay_ms: f64,
    #[arg(long, default_value_t = 0.0)]
    pub jitter_ms: f64,
    /// Random loss each way (%).
    #[arg(long, default_value_t = 0.0)]
    pub loss_pct: f64,
    /// Frames (%) sent without the delay, overtaking all queued before them (netem-like).
    #[arg(long, default_value_t = 0.0)]
    pub reorder_pct: f64,
    /// Frames (%) held back by an extra 1..=--displace-ms ms, overtaken by those behind
    /// them (the reordering of multi-carrier hubs and bonded lines).
    #[arg(long, default_value_t = 0.0)]
    pub displace_pct: f64,
    /// Largest extra delay of a displaced frame (ms).
    #[arg(long, default_value_t = 20.0)]
    pub displace_ms: f64,
    /// Frames (%) delivered twice, the copy within 1 ms of the original.
    #[arg(long, default_value_t = 0.0)]
    pub dup_pct: f64,
    #[arg(long, default_value_t = 0.0)]
    pub corrupt_pct: f64,
    /// Drop-tail queue in front of each direction's serialiser (kB).
    #[arg(long, default_value_t = 1000.0)]
    pub queue_kb: f64,
    /// A setting for the site-to-hub direction only, after the flags above, with the keys
    /// of `set` (e.g. --up loss_pct=2 --up displace_pct=1); repeatable.
    #[arg(long = "up", value_name = "KEY=VALUE")]
    pub up_settings: Vec<String>,
    /// A setting for the hub-to-site direction only, like --up.
    #[arg(long = "down", value_name = "KEY=VALUE")]
    pub down_settings: Vec<String>,
    /// Fixed seed: the same loss pattern on every run.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Give every site a second link of its own (a dual-homed site: a terrestrial line beside
    /// the satellite), shaped as its first link and then changed by this setting, with the
    /// keys of `set` (up_/down_ for one direction), e.g. --second rate_mbit=100 --second
    /// delay_ms=10; repeatable. The second links are s1b, s2b, ... for cut, restore and set.
    #[arg(long = "second", value_name = "KEY=VALUE")]
    pub second_settings: Vec<String>,
    /// First three octets of the second links' /24 (default: --net's third octet plus one):
    /// controller .1, site i at .(10+i). Given without --second, every site gets a second
    /// link identical to its first.
    #[arg(long, value_name = "A.B.C")]
    pub second_net: Option<String>,
}

/// Three octets like `10.200.0`; an error names `flag`.
fn octets(flag: &str, s: &str) -> anyhow::Result<[u8; 3]> {
    let parsed: Option<Vec<u8>> = s.split('.').map(|o| o.parse::<u8>().ok()).collect();
    match parsed.as_deref() {
        Some(&[a, b, c]) => Ok([a, b, c]),
        _ => bail!("{flag} {s:?}: expected three octets like 10.200.0"),
    }
}

impl UpArgs {
    /// The topology these flags describe, checked (an error names the flag).
    pub fn spec(&self, prefix: &str) -> anyhow::Result<Spec> {
        let net = octets("--net", &self.net)?;
        let shape = |mbit: f64| Shape {
            rate_kbit: (mbit * 1000.0) as u64,
            delay_ms: self.delay_ms,
            jitter_ms: self.jitter_ms,
            loss_pct: self.loss_pct,
            reorder_pct: self.reorder_pct,
            displace_pct: self.displace_pct,
            displace_ms: self.displace_ms,
            dup_pct: self.dup_pct,
            corrupt_pct: self.corrupt_pct,
            queue_bytes: (self.queue_kb * 1000.0) as u64,
        };
        let mut up = shape(self.up_rate_mbit.unwrap_or(self.rate_mbit));
        let mut down = shape(self.rate_mbit);
        apply_flags(&mut up, "--up", &self.up_settings)?;
        apply_flags(&mut down, "--down", &self.down_settings)?;
        let second_net = self
            .second_net
            .as_deref()
            .map(|n| octets("--second-net", n))
            .transpose()?;
        let mut second = Vec::new();
        if !self.second_settings.is_empty() || second_net.is_some() {
            let (mut up2, mut down2) = (up.clone(), down.clone());
            apply_second(&mut up2, &mut down2, &self.second_settings)?;
            match second_net {
                Some(n) if n == net => bail!(
                    "--second-net {}: the same /24 as --net; the second links need their own",
                    self.second_net.as_deref().unwrap_or_default()
                ),
                None if net[2] == 255 => bail!(
                    "--second: the second links' /24 is by default --net's with its third octet \
                     plus one, and --net {} has none; give --second-net",
                    self.net
                ),
                _ => {}
            }
            second = vec![(up2, down2); self.sites];
        }
        Ok(Spec {
            prefix: prefix.to_string(),
            net,
            sites: vec![(up, down); self.sites],
            seed: self.seed,
            second,
            second_net,
        })
    }
}

/// Runs the command: `up` until a signal, the others as one request to the running emulator.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let prefix = cli.prefix;
    let request = match cli.cmd {
        Cmd::Up(args) => return up(&args.spec(&prefix)?).await,
        Cmd::Cut { site } => format!("cut {site}"),
        Cmd::Restore { site } => format!("restore {site}"),
        Cmd::Set { site, settings } => format!("set {site} {}", settings.join(" ")),
        Cmd::Status => "status".into(),
        Cmd::Down => {
            crate::topo::down_prefix(&prefix);
            return Ok(());
        }
    };
    let answer = control::request(&prefix, &request).await?;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    if answer["ok"] != true {
        bail!("{}", answer["error"].as_str().unwrap_or("request failed"));
    }
    Ok(())
}

/// Builds the topology, serves its control socket until SIGTERM or Ctrl-C, then removes it.
async fn up(spec: &Spec) -> anyhow::Result<()> {
    let topo = Topology::up(spec).context("building the topology")?;
    let sites = control::SiteLinks::of(&topo);
    let cancel = tokio_util::sync::CancellationToken::new();
    let path = control::socket_path(&spec.prefix);
    let server = tokio::spawn(control::serve(path.clone(), sites, cancel.clone()));
    let n = topo.sites();
    let second = match (topo.ctl_addr2(), topo.site_addr2(1), topo.site_addr2(n)) {
        (Some(ctl), Some(first), Some(last)) => format!(
            "; second links s1b..s{n}b: controller {ctl} (eth1), sites {first}..{last} (eth1)"
        ),
        _ => String::new(),
    };
    println!(
        "up: controller {} in {}; sites {}..{} in {}..{}{second}; control {}",
        topo.ctl_addr(),
        topo.ctl_ns(),
        topo.site_addr(1),
        topo.site_addr(n),
        topo.site_ns(1),
        topo.site_ns(n),
        path.display()
    );
    wait_for_signal().await;
    cancel.cancel();
    let _ = server.await;
    topo.down();
    println!("down");
    Ok(())
}

/// Applies one direction's `--up`/`--down KEY=VALUE` flags to the shape the other flags gave,
/// all together (`--up jitter_ms=50 --up delay_ms=100` is checked as a whole), and checks the
/// result. An error names the flag and the setting, unless the other flags were wrong already.
fn apply_flags(shape: &mut Shape, flag: &str, settings: &[String]) -> anyhow::Result<()> {
    let mut pairs = Vec::with_capacity(settings.len());
    for s in settings {
        let Some((k, v)) = s.split_once('=') else {
            bail!("{flag} {s:?}: expected KEY=VALUE, e.g. {flag} loss_pct=2");
        };
        pairs.push((k.to_string(), v.to_string()));
    }
    shape.apply(&pairs).map_err(|e| {
        if shape.validate().as_ref().err() == Some(&e) {
            // The other flags were wrong already, and these do not mend it: not their fault.
            anyhow::Error::msg(e)
        } else {
            anyhow::anyhow!("{flag}: {e}")
        }
    })
}

/// Applies `--second KEY=VALUE` flags to copies of the first link's shapes: an unprefixed key
/// changes both directions, `up_KEY` and `down_KEY` one (as in `set`); each direction's
/// settings are checked as a whole. An error names the flag.
fn apply_second(up: &mut Shape, down: &mut Shape, settings: &[String]) -> anyhow::Result<()> {
    let (mut ups, mut downs) = (Vec::new(), Vec::new());
    for s in settings {
        let Some((k, v)) = s.split_once('=') else {
            bail!("--second {s:?}: expected KEY=VALUE, e.g. --second loss_pct=2");
        };
        if let Some(k) = k.strip_prefix("up_") {
            ups.push(format!("{k}={v}"));
        } else if let Some(k) = k.strip_prefix("down_") {
            downs.push(format!("{k}={v}"));
        } else {
            ups.push(s.clone());
            downs.push(s.clone());
        }
    }
    let (mut next_up, mut next_down) = (up.clone(), down.clone());
    apply_flags(&mut next_up, "--second", &ups)?;
    apply_flags(&mut next_down, "--second", &downs)?;
    (*up, *down) = (next_up, next_down);
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_and_down_flags_set_one_direction_and_name_bad_keys() {
        let cli = Cli::try_parse_from([
            "tiandi-satlink",
            "up",
            "--displace-pct",
            "1",
            "--up",
            "jitter_ms=50",
            "--up",
            "delay_ms=100",
            "--down",
            "dup_pct=0.5",
        ])
        .expect("parses");
        let Cmd::Up(UpArgs {
            displace_pct,
            displace_ms,
            up_settings,
            down_settings,
            ..
        }) = cli.cmd
        else {
            panic!("expected up");
        };
        assert_eq!((displace_pct, displace_ms), (1.0, 20.0));
        let mut up = Shape::default();
        apply_flags(&mut up, "--up", &up_settings).expect("checked as a whole");
        assert_eq!((up.jitter_ms, up.delay_ms), (50.0, 100.0));
        let mut down = Shape::default();
        apply_flags(&mut down, "--down", &down_settings).expect("valid");
        assert_eq!((down.dup_pct, down.jitter_ms), (0.5, 0.0));

        let e = apply_flags(&mut up, "--up", &["foo=1".into()]).unwrap_err();
        assert!(
            e.to_string().contains("--up") && e.to_string().contains("foo"),
            "{e}"
        );
        let e = apply_flags(&mut down, "--down", &["dup_pct".into()]).unwrap_err();
        assert!(
            e.to_string().contains("--down") && e.to_string().contains("dup_pct"),
            "{e}"
        );
        let e = apply_flags(&mut down, "--down", &["displace_ms=1e6".into()]).unwrap_err();
        assert!(e.to_string().contains("displace_ms"), "{e}");
        assert_eq!(down.dup_pct, 0.5, "a failed flag changes nothing");

        // A jitter beyond the common delay is fine when --up raises the delay, and reported as
        // the common flags' fault when it does not.
        let wide = Shape {
            jitter_ms: 500.0,
            ..Shape::default()
        };
        let mut up = wide.clone();
        apply_flags(&mut up, "--up", &["delay_ms=600".into()]).expect("valid");
        let mut down = wide;
        let e = apply_flags(&mut down, "--down", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("jitter_ms") && !e.contains("--down"), "{e}");
        let e = apply_flags(
            &mut down,
            "--down",
            &["delay_ms=600".into(), "dup_pct=300".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--down") && e.contains("dup_pct"), "{e}");
        let e = apply_flags(&mut down, "--down", &["loss=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("jitter_ms") && !e.contains("--down"), "{e}");
    }

    fn up_spec(args: &[&str]) -> anyhow::Result<Spec> {
        let cli = Cli::try_parse_from(["tiandi-satlink", "up"].iter().chain(args))?;
        let Cmd::Up(up) = cli.cmd else {
            panic!("expected up");
        };
        up.spec("tdx")
    }

    #[test]
    fn second_flags_give_every_site_a_second_link() {
        let spec = up_spec(&[
            "--sites",
            "2",
            "--net",
            "10.9.0",
            "--rate-mbit",
            "10",
            "--delay-ms",
            "300",
            "--second",
            "rate_mbit=4",
            "--second",
            "up_delay_ms=10",
            "--second",
            "down_loss_pct=1",
        ])
        .expect("valid");
        assert_eq!(spec.second_net, None);
        assert_eq!(spec.second.len(), 2);
        assert_eq!(spec.second[0], spec.second[1]);
        let (up, down) = &spec.second[0];
        assert_eq!((up.rate_kbit, up.delay_ms, up.loss_pct), (4_000, 10.0, 0.0));
        assert_eq!(
            (down.rate_kbit, down.delay_ms, down.loss_pct),
            (4_000, 300.0, 1.0)
        );
        let (up, down) = &spec.sites[0];
        assert_eq!((up.rate_kbit, up.delay_ms), (10_000, 300.0));
        assert_eq!((down.rate_kbit, down.loss_pct), (10_000, 0.0));
        spec.validate().expect("a valid spec");

        // --second-net alone: second links identical to the first.
        let spec = up_spec(&["--net", "10.9.0", "--second-net", "10.9.7"]).expect("valid");
        assert_eq!(spec.second_net, Some([10, 9, 7]));
        assert_eq!(spec.second, spec.sites);
        // Neither: none.
        let spec = up_spec(&[]).expect("valid");
        assert!(spec.second.is_empty() && spec.second_net.is_none());

        // A setting checked as a whole per direction: the jitter fits the raised delay.
        up_spec(&[
            "--delay-ms",
            "10",
            "--second",
            "jitter_ms=50",
            "--second",
            "delay_ms=100",
        ])
        .expect("valid");

        for (args, words) in [
            (&["--second", "foo=1"][..], &["--second", "foo"][..]),
            (&["--second", "up_loss_pct=x"], &["--second", "loss_pct"]),
            (&["--second", "loss_pct"], &["--second", "KEY=VALUE"]),
            (&["--second", "dup_pct=300"], &["--second", "dup_pct"]),
            (&["--second-net", "10.9"], &["--second-net", "10.9"]),
            (
                &["--net", "10.9.0", "--second-net", "10.9.0"],
                &["--second-net", "--net"],
            ),
            (
                &["--net", "10.9.255", "--second", "loss_pct=1"],
                &["--second", "--second-net"],
            ),
        ] {
            let e = up_spec(args).unwrap_err().to_string();
            assert!(words.iter().all(|w| e.contains(w)), "{args:?}: {e}");
        }
    }
}
