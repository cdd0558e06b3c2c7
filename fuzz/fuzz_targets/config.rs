#![no_main]
//! Any configuration text is either a valid Config or an error naming what is wrong;
//! never a panic. A valid one renders to text that parses to the same values.
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use wazuh_agent::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = Config::parse(text, Path::new("fuzz.toml")) {
            // `render` is `section.key = value` lines; rebuild the tables and compare.
            let mut toml = String::new();
            let mut section = "";
            let rendered = c.render();
            for line in rendered.lines() {
                let (key, value) = line.split_once(" = ").expect("render writes key = value");
                let (s, k) = key.split_once('.').expect("render writes section.key");
                if s != section {
                    toml.push_str(&format!("[{s}]\n"));
                    section = s;
                }
                toml.push_str(&format!("{k} = {value}\n"));
            }
            let again = Config::parse(&toml, Path::new("fuzz.toml")).expect("a rendered config parses");
            assert_eq!(again.render(), rendered);
        }
    }
});
