//! Any text as a config file: either a config or a list of problems with lines inside the
//! file, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::config::{Config, ConfigError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let env = |_: &str| Some("fuzz-secret".to_owned());
    if let Err(ConfigError::Invalid(problems)) = Config::parse(text, "fuzz.toml", &env) {
        let lines = text.lines().count().max(1);
        for problem in problems {
            assert!(problem.line >= 1 && problem.line <= lines + 1, "{problem}");
        }
    }
});
