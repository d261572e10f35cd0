//! `shardgate migrate` commands that read only the migrations folder:
//! heads, branches, history, new, merge, and errors naming the file.

use std::path::Path;
use std::process::Command;

fn map(dir: &Path, migrations: &Path) -> std::path::PathBuf {
    let path = dir.join("map.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: 127.0.0.1:0\nauth: trust\nusers: [ {{ name: app }} ]\nshards:\n  - {{ name: s0, url: \"postgres://postgres@127.0.0.1:1/app\" }}\nmigrations: {{ dir: \"{}\" }}\n",
            migrations.display()
        ),
    )
    .unwrap();
    path
}

fn run(map: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .arg("migrate")
        .arg("--config")
        .arg(map)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn copy_fixture(to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/migrations/graph");
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        std::fs::create_dir_all(&target).unwrap();
        for file in std::fs::read_dir(entry.path()).unwrap() {
            let file = file.unwrap();
            std::fs::copy(file.path(), target.join(file.file_name())).unwrap();
        }
    }
}

#[test]
fn heads_branches_history() {
    let tmp = tempfile::tempdir().unwrap();
    let migrations = tmp.path().join("migrations");
    std::fs::create_dir(&migrations).unwrap();
    copy_fixture(&migrations);
    let map = map(tmp.path(), &migrations);

    let (ok, out, err) = run(&map, &["heads"]);
    assert!(ok, "{err}");
    assert_eq!(
        out,
        "d00000000001 (reports) (head) (depends on b10000000001)\ne00000000001 (head) (mergepoint)\n"
    );

    let (ok, out, _) = run(&map, &["branches"]);
    assert!(ok);
    assert_eq!(
        out,
        "a00000000001 (branchpoint), create users\n    -> b10000000001 (billing), create invoices\n    -> b20000000001 (audit), audit log\n"
    );

    let (ok, out, _) = run(&map, &["history"]);
    assert!(ok);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6, "{out}");
    assert!(out.contains("(c10000000001, b20000000001) -> e00000000001 (head) (mergepoint), merge billing and audit"), "{out}");
    assert!(
        out.contains("<base> -> a00000000001 (branchpoint), create users"),
        "{out}"
    );
    assert_eq!(
        *lines.last().unwrap(),
        "<base> -> a00000000001 (branchpoint), create users"
    );

    let (ok, out, _) = run(&map, &["history", "-r", "c1:e0"]);
    assert!(ok);
    assert_eq!(out.lines().count(), 3, "{out}"); // c1, b2 and the merge

    let (ok, _, err) = run(&map, &["history", "-r", "zz:heads"]);
    assert!(!ok);
    assert!(err.contains("No such revision or branch 'zz'"), "{err}");
}

#[test]
fn new_and_merge_write_revisions() {
    let tmp = tempfile::tempdir().unwrap();
    let migrations = tmp.path().join("migrations");
    std::fs::create_dir(&migrations).unwrap();
    copy_fixture(&migrations);
    let map = map(tmp.path(), &migrations);

    // Two heads: `new` needs --head, as in Alembic.
    let (ok, _, err) = run(&map, &["new", "add things"]);
    assert!(!ok);
    assert!(err.contains("Multiple heads are present"), "{err}");

    let (ok, out, err) = run(&map, &["merge", "-m", "join all"]);
    assert!(ok, "{err}");
    assert!(out.contains("_join_all"), "{out}");
    let (_, heads, _) = run(&map, &["heads"]);
    assert_eq!(heads.lines().count(), 1, "{heads}");
    let merge_id = heads.split_whitespace().next().unwrap().to_owned();

    let (ok, out, err) = run(&map, &["new", "Add Things!", "--depends-on", "audit"]);
    assert!(ok, "{err}");
    let written = out.trim().strip_prefix("wrote ").unwrap();
    assert!(written.ends_with("_add_things"), "{written}");
    let up = std::fs::read_to_string(Path::new(written).join("up.sql")).unwrap();
    assert!(
        up.contains(&format!("-- down_revision: {merge_id}")),
        "{up}"
    );
    assert!(up.contains("-- depends_on: b20000000001"), "{up}");
    assert!(Path::new(written).join("down.sql").exists());

    let (ok, out, err) = run(
        &map,
        &["new", "side", "--head", "base", "--branch-label", "side"],
    );
    assert!(ok, "{err}");
    assert!(out.contains("_side"));
    let (_, heads, _) = run(&map, &["heads"]);
    assert_eq!(heads.lines().count(), 2, "{heads}");
    assert!(heads.contains("(side)"), "{heads}");
}

#[test]
fn bad_revision_files_are_reported_with_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let migrations = tmp.path().join("migrations");
    let folder = migrations.join("aaaaaaaaaaaa_broken");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(
        folder.join("up.sql"),
        "-- revision: aaaaaaaaaaaa\n-- down_revision: bbbbbbbbbbbb\nSELECT 1;\n",
    )
    .unwrap();
    let map = map(tmp.path(), &migrations);
    let (ok, _, err) = run(&map, &["heads"]);
    assert!(!ok);
    assert!(
        err.contains("aaaaaaaaaaaa_broken/up.sql: down_revision bbbbbbbbbbbb does not exist"),
        "{err}"
    );

    std::fs::write(
        folder.join("up.sql"),
        "-- revision: aaaaaaaaaaaa\n-- kind: ddl\n",
    )
    .unwrap();
    let (ok, _, err) = run(&map, &["heads"]);
    assert!(!ok);
    assert!(
        err.contains("aaaaaaaaaaaa_broken/up.sql:2: kind `ddl` is not allowed"),
        "{err}"
    );
}
