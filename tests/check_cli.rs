//! `shardgate check` on the example maps (valid) and on broken fixtures (each
//! names the line and the problem, and every error of a file is reported).

use std::path::{Path, PathBuf};
use std::process::Command;

fn shardgate() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shardgate"));
    command.env_remove("SHARDGATE_TEST_SURELY_UNSET");
    command
}

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_map_is_valid() {
    let files = yaml_files("shard-config");
    let names: Vec<_> = files.iter().filter_map(|f| f.file_name()).collect();
    for required in ["demo.yaml", "hash.yaml", "range.yaml", "tenants.yaml"] {
        assert!(
            names.iter().any(|n| *n == required),
            "shard-config/{required} is missing"
        );
    }
    for file in files {
        let output = shardgate()
            .args(["check", "--config"])
            .arg(&file)
            .env("APP_PASSWORD", "example")
            .output()
            .expect("run shardgate check");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{} should be valid:\n{}",
            file.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains(": ok"), "{stdout}");
        assert!(
            stdout.contains("shards ("),
            "summary lists shards: {stdout}"
        );
    }
}

/// Each fixture carries `# expect: LINE: TEXT` lines; check must exit 1 and
/// print, for each, an error at that line containing that text.
#[test]
fn broken_maps_are_rejected_with_line_and_reason() {
    let files = yaml_files("tests/fixtures/bad-maps");
    assert!(
        files.len() >= 12,
        "expected at least a dozen broken maps, found {}",
        files.len()
    );
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read fixture");
        let expectations: Vec<(usize, String)> = text
            .lines()
            .filter_map(|line| line.strip_prefix("# expect: "))
            .map(|rest| {
                let (line, message) = rest.split_once(": ").expect("`# expect: LINE: TEXT`");
                (line.parse().expect("line number"), message.to_string())
            })
            .collect();
        assert!(
            !expectations.is_empty(),
            "{} has no `# expect:` line",
            file.display()
        );
        let output = shardgate()
            .args(["check", "--config"])
            .arg(&file)
            .output()
            .expect("run shardgate check");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(1),
            "{}: {stderr}",
            file.display()
        );
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with(&*file.to_string_lossy()))
            .collect();
        assert_eq!(
            errors.len(),
            expectations.len(),
            "{}: expected exactly {} error(s), got:\n{stderr}",
            file.display(),
            expectations.len()
        );
        for (line, message) in &expectations {
            let prefix = format!("{}:{line}:", file.display());
            assert!(
                errors
                    .iter()
                    .any(|e| e.starts_with(&prefix) && e.contains(message.as_str())),
                "{}: no error at line {line} saying `{message}`; got:\n{stderr}",
                file.display()
            );
        }
    }
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let output = shardgate()
        .args(["check", "--config", "/nonexistent/shardgate.yaml"])
        .output()
        .expect("run shardgate check");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot read shard map /nonexistent/shardgate.yaml"),
        "{stderr}"
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 400, .. proptest::prelude::ProptestConfig::default() })]

    /// Arbitrary text, and mutations of a valid map, give errors, never a panic.
    #[test]
    fn the_map_reader_never_panics(
        noise in "\\PC{0,200}",
        cut in 0usize..600,
        insert in "[ :{}\\[\\],\\-#'\"$\\n a-z0-9]{0,12}",
    ) {
        let _ = shardgate::config::Config::parse(Path::new("fuzz.yaml"), &noise, &|_| None);
        let valid = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("shard-config/range.yaml"))
            .expect("example map");
        let mut at = cut.min(valid.len());
        while !valid.is_char_boundary(at) {
            at -= 1;
        }
        let mutated = format!("{}{}{}", &valid[..at], insert, &valid[at..]);
        let _ = shardgate::config::Config::parse(Path::new("fuzz.yaml"), &mutated, &|_| Some("x".into()));
    }
}
