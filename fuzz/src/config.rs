//! Target `server_config`: the server's TOML configuration file, parsed and
//! validated; what validation accepts must be usable.

use std::time::Duration;

use quicnprotochat_server::Config;

/// Parses `data` as a configuration file.  The server turns each timeout of
/// an accepted file into deadlines (now + timeout), so each must fit one.
pub fn check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::from_toml_str(text) else {
        return;
    };
    let l = &config.limits;
    for (name, secs) in [
        ("auth_timeout_secs", l.auth_timeout_secs),
        ("idle_timeout_secs", l.idle_timeout_secs),
        ("frame_timeout_secs", l.frame_timeout_secs),
        ("request_timeout_secs", l.request_timeout_secs),
    ] {
        assert!(
            tokio::time::Instant::now()
                .checked_add(Duration::from_secs(secs))
                .is_some(),
            "limits.{name} = {secs} was accepted but overflows a deadline"
        );
    }
}
