//! Control of a running emulator from another process, over a Unix socket: one request line,
//! one JSON answer line. Requests: `cut SITE`, `restore SITE`, `set SITE key=value...`,
//! `status`. SITE is `s3` or `3`.

use std::path::PathBuf;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::emu::LinkHandle;

/// Where the control socket of the topology `prefix` lives.
pub fn socket_path(prefix: &str) -> PathBuf {
    PathBuf::from(format!("/run/tiandi-satlink/{prefix}.sock"))
}

/// Answers one request against `links` (site 1 is `links[0]`).
pub fn handle(links: &[LinkHandle], line: &str) -> Value {
    let mut words = line.split_whitespace();
    let verb = words.next().unwrap_or("");
    if verb == "status" {
        let sites: Vec<Value> = links
            .iter()
            .enumerate()
            .map(|(i, l)| json!({"site": format!("s{}", i + 1), "link": l.status()}))
            .collect();
        return json!({"ok": true, "sites": sites});
    }
    let site = words.next().unwrap_or("");
    let Some(link) = site
        .trim_start_matches('s')
        .parse::<usize>()
        .ok()
        .filter(|i| (1..=links.len()).contains(i))
        .map(|i| &links[i - 1])
    else {
        return json!({"ok": false, "error": format!("unknown site {site:?} (there are {} sites: s1..s{})", links.len(), links.len())});
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
    links: Vec<LinkHandle>,
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
        let links = links.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut answer = handle(&links, &line).to_string();
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

    #[test]
    fn requests_change_links_and_errors_say_why() {
        let links = vec![
            LinkHandle::new(Shape::default(), Shape::default(), Some(1)),
            LinkHandle::new(Shape::default(), Shape::default(), Some(2)),
        ];
        assert_eq!(handle(&links, "cut s2")["ok"], true);
        assert!(links[1].status().cut && !links[0].status().cut);
        assert_eq!(handle(&links, "restore 2")["ok"], true);
        assert!(!links[1].status().cut);
        let a = handle(&links, "set s1 loss_pct=5 down_rate_mbit=2");
        assert_eq!(a["ok"], true, "{a}");
        let st = links[0].status();
        assert_eq!((st.up.loss_pct, st.down.loss_pct), (5.0, 5.0));
        assert_eq!((st.up.rate_kbit, st.down.rate_kbit), (20_000, 2_000));
        let a = handle(&links, "cut s9");
        assert!(a["error"].as_str().unwrap().contains("s9"), "{a}");
        let a = handle(&links, "set s1 loss_pct=500");
        assert!(a["error"].as_str().unwrap().contains("loss_pct"), "{a}");
        assert_eq!(links[0].status().up.loss_pct, 5.0);
        assert_eq!(
            handle(&links, "status")["sites"].as_array().unwrap().len(),
            2
        );
    }
}
