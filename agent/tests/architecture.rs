//! The agent's module structure, checked on every `cargo test`: the top-level modules of the
//! crate import each other without a cycle (a layered graph), and docs/architecture.md has a
//! row for every one of them. Run alone with `cargo test -p weft --test architecture`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The modules `lib.rs` declares.
fn modules() -> Vec<String> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).expect("reading lib.rs");
    lib.lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .filter_map(|l| l.strip_suffix(';'))
        .map(str::to_owned)
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading a source directory").flatten() {
        let p = entry.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The files of a top-level module: `src/NAME.rs` and everything under `src/NAME/`.
fn files_of(module: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let file = src().join(format!("{module}.rs"));
    if file.exists() {
        out.push(file);
    }
    let dir = src().join(module);
    if dir.is_dir() {
        rust_files(&dir, &mut out);
    }
    out
}

fn ident(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len());
    &s[..end]
}

/// The top-level modules a piece of source names through `crate::` paths, including those in
/// `use crate::{a::X, b}` groups. Line comments are skipped.
fn referenced(source: &str) -> BTreeSet<String> {
    let code: String = source
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item_start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        item_start = false;
                        out.insert(ident(&group[j..]).to_owned());
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest).to_owned());
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules();
    let known: BTreeSet<&String> = mods.iter().collect();
    mods.iter()
        .map(|m| {
            let mut deps = BTreeSet::new();
            for f in files_of(m) {
                let text = std::fs::read_to_string(&f).expect("reading a source file");
                deps.extend(referenced(&text).into_iter().filter(|d| d != m && known.contains(d)));
            }
            (m.clone(), deps)
        })
        .collect()
}

/// A cycle in `g`, if there is one, as the path of modules around it.
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut cycle = path[i..].to_vec();
            cycle.push(n.to_owned());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_owned());
        for d in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, g, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    g.keys().find_map(|n| visit(n, g, &mut Vec::new(), &mut done))
}

#[test]
fn the_scanner_sees_paths_and_groups() {
    let src = "use crate::a::X;\nuse crate::{b::Y, c, d::{e, f}};\n// crate::g is a comment\nlet z = crate::h::f();";
    let got: Vec<String> = referenced(src).into_iter().collect();
    assert_eq!(got, ["a", "b", "c", "d", "h"]);
    let g = BTreeMap::from([
        ("x".to_owned(), BTreeSet::from(["y".to_owned()])),
        ("y".to_owned(), BTreeSet::from(["x".to_owned()])),
    ]);
    assert_eq!(find_cycle(&g), Some(vec!["x".to_owned(), "y".to_owned(), "x".to_owned()]));
}

#[test]
fn no_import_cycle_among_the_agents_modules() {
    let g = graph();
    assert!(g.len() > 10, "found only {} modules: is lib.rs still declaring them?", g.len());
    if let Some(cycle) = find_cycle(&g) {
        let edges: Vec<String> = g
            .iter()
            .map(|(m, d)| format!("{m} -> {}", d.iter().cloned().collect::<Vec<_>>().join(", ")))
            .collect();
        panic!("import cycle: {}\nall edges:\n{}", cycle.join(" -> "), edges.join("\n"));
    }
}

#[test]
fn every_module_is_in_the_architecture_table() {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/architecture.md");
    let doc = std::fs::read_to_string(&doc).expect("reading docs/architecture.md");
    let missing: Vec<String> = modules()
        .into_iter()
        .filter(|m| !doc.lines().any(|l| l.starts_with(&format!("| `{m}`"))))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/architecture.md has no table row (`| `name` | ...`) for: {missing:?}"
    );
}
