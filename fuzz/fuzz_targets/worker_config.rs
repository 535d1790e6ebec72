//! Arbitrary text as the worker's config file: parsed strictly and
//! validated (no panic, whatever the text); a config that validates
//! survives a round trip through TOML unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shardline_worker::{ConfigFile, WorkerConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = WorkerConfig::parse(text) else { return };
    if config.validate().is_err() {
        return;
    }
    let _ = config.concurrency();
    let written = match toml::to_string(&config) {
        Ok(t) => t,
        Err(e) => panic!("a valid config does not serialise: {e}\n{config:?}"),
    };
    match WorkerConfig::parse(&written) {
        Ok(again) => assert_eq!(again, config, "round trip through\n{written}"),
        Err(e) => panic!("a valid config does not read back: {e}\n{written}"),
    }
});
