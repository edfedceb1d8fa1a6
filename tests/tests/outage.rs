//! Reports survive outages: the controller goes away and comes back; the agent is SIGKILLed in
//! the middle of draining a backlog; the controller is SIGKILLed while reports stream in.
//! Every report arrives once, in order.

use std::time::Duration;

use tiandi_tests::{AgentProc, ControllerProc, wait_for};

/// A controller and one enrolled agent (not started) reporting every `interval_s`.
fn one_site(
    dir: &std::path::Path,
    site: &str,
    province: &str,
    interval_s: f64,
) -> (ControllerProc, AgentProc) {
    let ctl = ControllerProc::start(&dir.join("ctl"));
    let token = ctl.enroll(site, province, &[]);
    let agent = AgentProc::enroll(
        &dir.join("agent"),
        ctl.quic,
        &token,
        &format!("interval_s = {interval_s}"),
    );
    (ctl, agent)
}

fn latest_pushed(agent_log: &str) -> usize {
    agent_log.matches("Report spooled.").count()
}

#[test]
fn controller_outage_loses_nothing_and_duplicates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut ctl, mut agent) = one_site(tmp.path(), "gd-001", "GD", 0.2);
    agent.start();
    wait_for("first reports", Duration::from_secs(30), || {
        (ctl.metric("tiandi_reports_total") >= 5.0).then_some(())
    });

    // Outage: the controller is gone for a while; the agent spools.
    ctl.stop();
    std::thread::sleep(Duration::from_secs(6));
    let during = latest_pushed(&agent.log());
    ctl.restart();
    // The backlog drains behind the current state.
    std::thread::sleep(Duration::from_secs(3));
    agent.stop();
    let pushed = latest_pushed(&agent.log());
    assert!(
        pushed > during && during >= 20,
        "agent spooled {during} during the outage, {pushed} in all"
    );
    let seqs = wait_for("every report stored", Duration::from_secs(30), || {
        let s = ctl.history_seqs("gd-001");
        (s.len() >= pushed).then_some(s)
    });
    let expected: Vec<u64> = (1..=pushed as u64).collect();
    assert_eq!(
        seqs, expected,
        "history must hold 1..={pushed} exactly once, in order"
    );
    assert_eq!(ctl.metric("tiandi_reports_duplicate_total"), 0.0);
    let site = ctl.api("/api/sites/gd-001").unwrap();
    assert_eq!(site["latest_seq"].as_u64(), Some(pushed as u64));
}

#[test]
fn sigkill_mid_backlog_resends_nothing_acknowledged_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut ctl, mut agent) = one_site(tmp.path(), "sc-007", "SC", 0.05);
    ctl.stop();
    // Build a backlog of a few hundred reports while the controller is down.
    agent.start();
    std::thread::sleep(Duration::from_secs(12));
    ctl.restart();
    // Kill the agent while it drains.
    wait_for("the drain to start", Duration::from_secs(30), || {
        (ctl.metric("tiandi_reports_total") >= 1.0).then_some(())
    });
    agent.kill9();
    let stored_at_kill = ctl.metric("tiandi_reports_total");
    let pushed_before_kill = latest_pushed(&agent.log());
    eprintln!("killed with {stored_at_kill} of ~{pushed_before_kill} stored");
    agent.start();
    std::thread::sleep(Duration::from_secs(2));
    agent.stop();
    let pushed = latest_pushed(&agent.log());
    // A stopped agent keeps what is unacknowledged in its spool (a busy machine may not have
    // drained it in 2 s): run it again until everything spooled so far is stored.
    agent.start();
    wait_for("every report stored", Duration::from_secs(60), || {
        (ctl.history_seqs("sc-007").len() >= pushed).then_some(())
    });
    agent.stop();
    let seqs = ctl.history_seqs("sc-007");
    // The spool was durable: every spooled report arrived, once, in order. Nothing
    // acknowledged came back.
    assert!(
        seqs.len() >= pushed,
        "{} stored, {pushed} spooled",
        seqs.len()
    );
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected);
    assert_eq!(
        ctl.metric("tiandi_reports_duplicate_total"),
        0.0,
        "an acknowledged report was sent again"
    );
}

#[test]
fn controller_sigkill_loses_nothing_it_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut ctl, mut agent) = one_site(tmp.path(), "hb-012", "HB", 0.05);
    agent.start();
    wait_for("reports streaming in", Duration::from_secs(30), || {
        (ctl.metric("tiandi_reports_total") >= 40.0).then_some(())
    });
    // Between two checkpoints: sled's files miss the latest acknowledged reports, which only
    // the write-ahead log holds. The agent has deleted them from its spool.
    ctl.kill9_and_restart();
    std::thread::sleep(Duration::from_secs(2));
    let replayed = ctl
        .log()
        .contains("Stored again what the write-ahead log held");
    eprintln!("write-ahead log replayed at restart: {replayed}");
    agent.stop();
    let pushed = latest_pushed(&agent.log());
    agent.start();
    wait_for("every report stored", Duration::from_secs(60), || {
        (ctl.history_seqs("hb-012").len() >= pushed).then_some(())
    });
    agent.stop();
    let seqs = ctl.history_seqs("hb-012");
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(
        seqs, expected,
        "a gap is a report acknowledged before the kill and lost with it"
    );
    assert!(
        seqs.len() >= pushed,
        "{} stored, {pushed} spooled",
        seqs.len()
    );
}
