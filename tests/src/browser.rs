//! A real browser for the console's tests and benchmark: Debian's headless Chromium driven over
//! WebDriver (`chromedriver`, through `fantoccini`), with a fresh profile each time (cold: no
//! cache, no cookies). Synchronous on the outside (a runtime of its own), like the rest of the
//! harness.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// Where the browser and its driver are (Debian's `chromium` and `chromium-driver`).
pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Whether this machine can run the browser tests (`scripts/test` installs both).
pub fn available() -> bool {
    Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists()
}

pub struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free port and a headless Chromium with a fresh profile.
    pub fn start() -> Browser {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let port = crate::free_tcp().port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver (apt install chromium-driver)");
        let profile = tempfile::tempdir().expect("a profile dir");
        crate::wait_for("chromedriver", Duration::from_secs(20), || {
            crate::get_json(&format!("http://127.0.0.1:{port}/status"))
                .filter(|v| v["value"]["ready"] == json!(true))
        });
        // The flags peers.md lists: without the background-networking ones Chromium floods
        // refused connections looking for the internet.
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--disable-dev-shm-usage", "--window-size=1600,1000",
                    "--force-device-scale-factor=1", "--lang=zh-CN",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
            "goog:loggingPrefs": { "browser": "ALL" },
        });
        let caps = match caps {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let client = rt
            .block_on(async {
                let mut b =
                    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
                b.capabilities(caps);
                b.connect(&format!("http://127.0.0.1:{port}")).await
            })
            .expect("a WebDriver session with Chromium");
        Browser {
            rt,
            client: Some(client),
            driver,
            _profile: profile,
        }
    }

    fn c(&self) -> &Client {
        self.client.as_ref().expect("a live session")
    }

    pub fn goto(&self, url: &str) {
        self.rt
            .block_on(self.c().goto(url))
            .unwrap_or_else(|e| panic!("opening {url}: {e}"));
    }

    pub fn url(&self) -> String {
        self.rt
            .block_on(self.c().current_url())
            .expect("the current URL")
            .to_string()
    }

    /// Runs `script` (a function body: `return …`, `arguments[0]`…) in the page.
    pub fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.rt
            .block_on(self.c().execute(script, args))
            .unwrap_or_else(|e| panic!("running {script:?}: {e}"))
    }

    /// Runs an async script: it calls `arguments[arguments.length - 1](result)` when done.
    pub fn js_async(&self, script: &str, args: Vec<Value>) -> Value {
        self.rt
            .block_on(self.c().execute_async(script, args))
            .unwrap_or_else(|e| panic!("running {script:?}: {e}"))
    }

    /// Waits until `css` matches an element (polling the page itself).
    pub fn wait_css(&self, css: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            let n = self.js(
                "return document.querySelectorAll(arguments[0]).length",
                vec![json!(css)],
            );
            if n.as_u64().unwrap_or(0) > 0 {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "no {css} on {} after {timeout:?}; page text: {}",
                self.url(),
                self.text("body").chars().take(600).collect::<String>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `cond` (a JS expression) is truthy; returns its value.
    pub fn wait_js(&self, what: &str, cond: &str, timeout: Duration) -> Value {
        let start = Instant::now();
        loop {
            let v = self.js(&format!("return ({cond})"), vec![]);
            if !(v.is_null() || v == json!(false) || v == json!(0) || v == json!("")) {
                return v;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what} on {}",
                self.url()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn text(&self, css: &str) -> String {
        self.js(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : ''",
            vec![json!(css)],
        )
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    pub fn count(&self, css: &str) -> usize {
        self.js(
            "return document.querySelectorAll(arguments[0]).length",
            vec![json!(css)],
        )
        .as_u64()
        .unwrap_or(0) as usize
    }

    pub fn click(&self, css: &str) {
        self.rt
            .block_on(async { self.c().find(Locator::Css(css)).await?.click().await })
            .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
    }

    /// Types `text` into the field `css` (cleared first), as a user would.
    pub fn fill(&self, css: &str, text: &str) {
        self.rt
            .block_on(async {
                let e = self.c().find(Locator::Css(css)).await?;
                e.clear().await?;
                e.send_keys(text).await
            })
            .unwrap_or_else(|e| panic!("typing into {css}: {e}"));
    }

    /// Chooses `value` in the `<select>` `css` and tells the page it changed.
    pub fn select(&self, css: &str, value: &str) {
        self.rt
            .block_on(async {
                self.c()
                    .find(Locator::Css(css))
                    .await?
                    .select_by_value(value)
                    .await
            })
            .unwrap_or_else(|e| panic!("choosing {value} in {css}: {e}"));
    }

    /// Logs in from the current page of the console's origin (any page of it: the licence
    /// text loads nothing else) by posting to `/api/login` as the login form does; the browser
    /// keeps the session cookie. Nothing of the console is cached, so the next page is cold.
    pub fn log_in_by_api(&self, user: &str, password: &str) {
        let status = self.js_async(
            r#"const [user, password, done] = arguments;
               fetch('/api/login', { method: 'POST', headers: { 'content-type': 'application/json' },
                 body: JSON.stringify({ user, password }) }).then(r => done(r.status), e => done(String(e)));"#,
            vec![json!(user), json!(password)],
        );
        assert_eq!(
            status,
            json!(200),
            "logging in as {user} from {}",
            self.url()
        );
    }

    /// A PNG of the whole window, written to `path`.
    pub fn screenshot(&self, path: &Path) {
        let png = self
            .rt
            .block_on(self.c().screenshot())
            .expect("a screenshot");
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).expect("the screenshot dir");
        }
        std::fs::write(path, png).expect("writing the screenshot");
    }

    /// Errors the page logged (console errors, CSP violations, failed loads).
    pub fn console_errors(&self) -> Vec<String> {
        // chromedriver's log endpoint (not in the W3C protocol; fantoccini passes it through).
        let logs = self.rt.block_on(self.c().issue_cmd(LogCommand));
        match logs {
            Ok(Value::Array(entries)) => entries
                .into_iter()
                .filter(|e| e["level"] == json!("SEVERE"))
                .filter_map(|e| e["message"].as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// chromedriver's `GET /session/{id}/se/log` for the browser's console.
#[derive(Debug)]
struct LogCommand;

impl fantoccini::wd::WebDriverCompatibleCommand for LogCommand {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }
    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(json!({"type": "browser"}).to_string()),
        )
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(5), c.close()).await });
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Where the tests keep their screenshots: `target/console-screenshots/` (next to the
/// binaries' directory), kept after the run as artifacts.
pub fn screenshot_dir() -> PathBuf {
    let bin = crate::bin("tiandi-controller");
    bin.parent()
        .and_then(|d| d.parent())
        .map(|t| t.join("console-screenshots"))
        .expect("the target dir")
}
