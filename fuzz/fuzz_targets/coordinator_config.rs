//! Arbitrary text as the coordinator's config file: parsed strictly and
//! validated as `ConfigFile::load` does (no panic, whatever the text); a
//! config that validates also yields its core config and every mapping,
//! and survives a round trip through TOML unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shardline_coordinator::config::{Config, ConfigFile};
use shardline_proto::LeaseId;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = Config::parse(text) else { return };
    if config.validate().is_err() {
        return;
    }
    let _ = (config.core(), config.handoff_timeout());
    for s in &config.streams {
        let _ = config.mapping(&LeaseId::shard(s.name.as_str(), 0));
    }
    for s in &config.subscriptions {
        let _ = config.mapping(&LeaseId::slot(s.name.as_str(), 0));
    }
    let written = match toml::to_string(&config) {
        Ok(t) => t,
        Err(e) => panic!("a valid config does not serialise: {e}\n{config:?}"),
    };
    match Config::parse(&written) {
        Ok(again) => assert_eq!(again, config, "round trip through\n{written}"),
        Err(e) => panic!("a valid config does not read back: {e}\n{written}"),
    }
});
