//! Enrollment (`link/src/enroll.rs`, `controller/src/enroll.rs`, `controller/src/registry.rs`):
//! the token an operator pastes and the controller redeems, the JSON request the controller
//! reads from a stranger's stream and the JSON answer the agent reads, and the name grammar
//! every site ID and file name from outside passes (`link/src/names.rs`). Holds: no panic; the
//! agent and the controller accept exactly the same tokens and pin the same lowercase hex
//! fingerprint; the JSON messages survive a round trip; a name that passes is in its grammar.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tiandi_controller::registry::parse_token;
use tiandi_link::enroll::{EnrollRequest, EnrollResponse, MAX_ENROLL_MESSAGE, token_fingerprint};
use tiandi_link::names::{MAX_FILE_NAME, MAX_ID, validate_file_name, validate_name};

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_ENROLL_MESSAGE {
        return;
    }
    if let Ok(req) = serde_json::from_slice::<EnrollRequest>(data) {
        let again: EnrollRequest =
            serde_json::from_slice(&serde_json::to_vec(&req).unwrap()).unwrap();
        assert_eq!(
            (again.token, again.csr_pem),
            (req.token.clone(), req.csr_pem)
        );
        token(&req.token);
    }
    if let Ok(resp) = serde_json::from_slice::<EnrollResponse>(data) {
        let v = serde_json::to_value(&resp).unwrap();
        let again: EnrollResponse = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(serde_json::to_value(&again).unwrap(), v);
    }
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    token(s);
    if validate_name("site ID", s).is_ok() {
        assert!(!s.is_empty() && s.len() <= MAX_ID);
        assert!(s.as_bytes()[0].is_ascii_alphanumeric());
        assert!(
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        );
        assert!(s != "." && s != "..");
    }
    if validate_file_name("file name", s).is_ok() {
        assert!(!s.is_empty() && s.len() <= MAX_FILE_NAME);
        assert!(!s.starts_with('.') && !s.contains(['/', '\\', '\0']));
        let p = std::path::Path::new("/inbox").join(s);
        assert_eq!(
            p.parent(),
            Some(std::path::Path::new("/inbox")),
            "{s:?} leaves its directory"
        );
    }
});

fn token(t: &str) {
    let agent = token_fingerprint(t).ok();
    let controller = parse_token(t).ok();
    assert_eq!(
        agent.as_deref(),
        controller.as_ref().map(|(_, fp)| fp.as_str()),
        "agent and controller disagree on {t:?}"
    );
    if let Some(fp) = agent {
        assert!(
            fp.len() == 64
                && fp
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
    }
}
