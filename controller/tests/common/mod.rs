//! Set-up the controller's integration tests share.

use tiandi_controller::Config;
use tiandi_link::LinkProfile;

/// A controller configuration in `dir` with every listener on a free loopback port.
pub fn config(dir: &std::path::Path) -> Config {
    let mut cfg = Config {
        data_dir: dir.join("ctl"),
        profile: LinkProfile::Terrestrial,
        // Files to send live in the test's directory (the data dir inside it stays refused).
        outgoing_dirs: vec![dir.to_path_buf()],
        ..Config::default()
    };
    cfg.quic_listen = "127.0.0.1:0".parse().unwrap();
    cfg.api_listen = "127.0.0.1:0".parse().unwrap();
    cfg.ops_listen = "127.0.0.1:0".parse().unwrap();
    cfg
}
