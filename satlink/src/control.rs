//! Control of a running emulator from another process, over a Unix socket: one request line,
//! one JSON answer line. Requests: `cut LINK`, `restore LINK`, `set LINK key=value...`,
//! `status`. LINK is site 3's link as `s3` (or `3`), or its second link, when the sites have
//! them, as `s3b` (or `3b`).

use std::path::PathBuf;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::emu::LinkHandle;
use crate::topo::Topology;

/// One site's links, as the control socket sees them.
#[derive(Clone)]
pub struct SiteLinks {
    /// The site's link (`s3`).
    pub link: LinkHandle,
    /// Its second link (`s3b`), if it has one.
    pub second: Option<LinkHandle>,
}

impl SiteLinks {
    /// Every site's links in `topo`, site 1 first.
    pub fn of(topo: &Topology) -> Vec<SiteLinks> {
        (1..=topo.sites())
            .map(|i| SiteLinks {
                link: topo.link(i).clone(),
                second: topo.second_link(i).cloned(),
            })
            .collect()
    }
}

/// The names of `sites` sites' links, for error messages: `s1..s4`, and `s1b..s4b` too when
/// there are second links.
fn link_names(sites: usize, has_second: bool) -> String {
    let range = |suffix: &str| match sites {
        0 => "none".to_string(),
        1 => format!("s1{suffix}"),
        n => format!("s1{suffix}..s{n}{suffix}"),
    };
    if has_second {
        format!(
            "{} (first links) and {} (second links)",
            range(""),
            range("b")
        )
    } else {
        range("")
    }
}

/// Which link `name` means among `sites` sites: `s3` or `3` is site 3's link, `(3, false)`;
/// `s3b` or `3b` its second link, `(3, true)`, refused when there are no second links.
pub fn parse_link(name: &str, sites: usize, has_second: bool) -> Result<(usize, bool), String> {
    let unknown = || {
        format!(
            "unknown link {name:?}: links are {}",
            link_names(sites, has_second)
        )
    };
    let bare = name.strip_prefix('s').unwrap_or(name);
    let (digits, second) = match bare.strip_suffix('b') {
        Some(d) => (d, true),
        None => (bare, false),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(unknown());
    }
    let site = digits
        .parse::<usize>()
        .ok()
        .filter(|i| (1..=sites).contains(i))
        .ok_or_else(unknown)?;
    if second && !has_second {
        return Err(format!(
            "link {name:?}: this topology has no second links (links are {}; \
             `up --second KEY=VALUE` gives every site one)",
            link_names(sites, false)
        ));
    }
    Ok((site, second))
}

/// Where the control socket of the topology `prefix` lives.
pub fn socket_path(prefix: &str) -> PathBuf {
    PathBuf::from(format!("/run/tiandi-satlink/{prefix}.sock"))
}

/// Answers one request against `sites` (site 1 is `sites[0]`).
pub fn handle(sites: &[SiteLinks], line: &str) -> Value {
    let mut words = line.split_whitespace();
    let verb = words.next().unwrap_or("");
    if verb == "status" {
        let sites: Vec<Value> = sites
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut v = json!({"site": format!("s{}", i + 1), "link": s.link.status()});
                if let Some(second) = &s.second {
                    v["second"] = json!(second.status());
                }
                v
            })
            .collect();
        return json!({"ok": true, "sites": sites});
    }
    let name = words.next().unwrap_or("");
    let has_second = sites.iter().any(|s| s.second.is_some());
    let link = match parse_link(name, sites.len(), has_second) {
        Ok((i, false)) => &sites[i - 1].link,
        Ok((i, true)) => match &sites[i - 1].second {
            Some(l) => l,
            None => {
                return json!({"ok": false, "error": format!("site s{i} has no second link")});
            }
        },
        Err(e) => return json!({"ok": false, "error": e}),
    };
    match verb {
        "cut" => {
            link.cut();
            json!({"ok": true})
        }
        "restore" => {
            link.restore();
            json!({"ok": true})
        }
        "set" => {
            let mut settings = Vec::new();
            for w in words {
                let Some((k, v)) = w.split_once('=') else {
                    return json!({"ok": false, "error": format!("expected key=value, got {w:?}")});
                };
                settings.push((k.to_string(), v.to_string()));
            }
            match link.set(&settings) {
                Ok(()) => json!({"ok": true, "link": link.status()}),
                Err(e) => json!({"ok": false, "error": e}),
            }
        }
        other => {
            json!({"ok": false, "error": format!("unknown request {other:?}: cut, restore, set, status")})
        }
    }
}

/// Serves the control socket until cancelled; removes it afterwards.
pub async fn serve(
    path: PathBuf,
    sites: Vec<SiteLinks>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let path = path.as_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    loop {
        let (stream, _) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => r?,
        };
        let sites = sites.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut answer = handle(&sites, &line).to_string();
                answer.push('\n');
                if w.write_all(answer.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// Sends one request to the emulator of `prefix` and returns its answer.
pub async fn request(prefix: &str, line: &str) -> std::io::Result<Value> {
    let path = socket_path(prefix);
    let stream = UnixStream::connect(&path).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "{}: {e} (is `tiandi-satlink up --prefix {prefix}` running?)",
                path.display()
            ),
        )
    })?;
    let (r, mut w) = stream.into_split();
    w.write_all(format!("{line}\n").as_bytes()).await?;
    let mut answer = String::new();
    BufReader::new(r).read_line(&mut answer).await?;
    serde_json::from_str(&answer)
        .map_err(|e| std::io::Error::other(format!("bad answer {answer:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Shape;

    fn site(seed: u64, second: bool) -> SiteLinks {
        let link = || LinkHandle::new(Shape::default(), Shape::default(), Some(seed));
        SiteLinks {
            link: link(),
            second: second.then(link),
        }
    }

    #[test]
    fn requests_change_links_and_errors_say_why() {
        let sites = vec![site(1, false), site(2, false)];
        let links: Vec<_> = sites.iter().map(|s| s.link.clone()).collect();
        assert_eq!(handle(&sites, "cut s2")["ok"], true);
        assert!(links[1].status().cut && !links[0].status().cut);
        assert_eq!(handle(&sites, "restore 2")["ok"], true);
        assert!(!links[1].status().cut);
        let a = handle(&sites, "set s1 loss_pct=5 down_rate_mbit=2");
        assert_eq!(a["ok"], true, "{a}");
        let st = links[0].status();
        assert_eq!((st.up.loss_pct, st.down.loss_pct), (5.0, 5.0));
        assert_eq!((st.up.rate_kbit, st.down.rate_kbit), (20_000, 2_000));
        let a = handle(&sites, "cut s9");
        assert!(a["error"].as_str().unwrap().contains("s9"), "{a}");
        let a = handle(&sites, "set s1 loss_pct=500");
        assert!(a["error"].as_str().unwrap().contains("loss_pct"), "{a}");
        assert_eq!(links[0].status().up.loss_pct, 5.0);
        let st = handle(&sites, "status");
        let st = st["sites"].as_array().unwrap();
        assert_eq!(st.len(), 2);
        assert!(st[0].get("second").is_none(), "{st:?}");
    }

    #[test]
    fn link_names_pick_the_first_or_the_second_link() {
        assert_eq!(parse_link("s2b", 3, true), Ok((2, true)));
        assert_eq!(parse_link("2b", 3, true), Ok((2, true)));
        assert_eq!(parse_link("2", 3, true), Ok((2, false)));
        assert_eq!(parse_link("s3", 3, false), Ok((3, false)));
        for bad in ["s4", "s0", "s", "", "sb", "s2c", "x2", "s-1", "s2bb", "ss2"] {
            let e = parse_link(bad, 3, true).unwrap_err();
            assert!(
                e.contains(&format!("{bad:?}")) && e.contains("s1..s3") && e.contains("s1b..s3b"),
                "{bad}: {e}"
            );
        }
        let e = parse_link("s4", 3, false).unwrap_err();
        assert!(e.contains("s1..s3") && !e.contains("s1b"), "{e}");
        let e = parse_link("s1b", 3, false).unwrap_err();
        assert!(
            e.contains("\"s1b\"") && e.contains("no second links"),
            "{e}"
        );
        let e = parse_link("s2", 1, true).unwrap_err();
        assert!(e.contains("s1 (first links) and s1b (second links)"), "{e}");
    }

    #[test]
    fn second_links_are_cut_set_and_listed_apart() {
        let sites = vec![site(1, true), site(3, true)];
        let second = sites[1].second.clone().expect("second link");
        assert_eq!(handle(&sites, "cut s2b")["ok"], true);
        assert!(second.status().cut && !sites[1].link.status().cut);
        let a = handle(&sites, "set s2b loss_pct=5");
        assert_eq!(a["ok"], true, "{a}");
        assert_eq!(a["link"]["up"]["loss_pct"], 5.0, "{a}");
        assert_eq!(sites[1].link.status().up.loss_pct, 0.0);
        assert_eq!(handle(&sites, "restore 2b")["ok"], true);
        assert!(!second.status().cut);
        let st = handle(&sites, "status");
        assert_eq!(st["sites"][1]["second"]["up"]["loss_pct"], 5.0, "{st}");
        assert_eq!(st["sites"][1]["link"]["up"]["loss_pct"], 0.0, "{st}");
        let a = handle(&sites, "cut s3b");
        assert!(a["error"].as_str().unwrap().contains("s1b..s2b"), "{a}");

        // Second links on some sites only (not what a topology builds, but answered).
        let sites = vec![site(1, true), site(2, false)];
        let a = handle(&sites, "cut s2b");
        assert!(
            a["error"].as_str().unwrap().contains("no second link"),
            "{a}"
        );
    }
}
