//! The README's command-line section and `overlay-agent <command> --help`
//! name the same flags.

use std::collections::BTreeSet;

use overlay_tests::agent_binary;

/// Long flags (`--name`) in `text`.
fn flags(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2 && w[2..].starts_with(|c: char| c.is_ascii_lowercase()))
        .map(str::to_owned)
        .collect()
}

/// The README's synopsis of `overlay-agent <command>`: the code block of
/// "Running the agent", continuation lines included.
fn readme_synopsis(command: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = readme.split("## Running the agent").nth(1).expect("README has \"## Running the agent\"");
    let block = section.split("```").nth(1).expect("a code block in that section");
    let mut synopsis = String::new();
    let mut inside = false;
    for line in block.lines() {
        if line.starts_with("overlay-agent ") {
            inside = line.starts_with(&format!("overlay-agent {command} ")) || line == format!("overlay-agent {command}");
        }
        if inside {
            synopsis.push_str(line);
            synopsis.push('\n');
        }
    }
    synopsis
}

#[test]
fn readme_synopsis_and_help_name_the_same_flags() {
    let mut differences = Vec::new();
    for command in ["run", "inspect", "check", "cleanup"] {
        let out = std::process::Command::new(agent_binary()).args([command, "--help"]).output().unwrap();
        let help: BTreeSet<String> = flags(&String::from_utf8_lossy(&out.stdout)).into_iter().filter(|f| f != "--help").collect();
        let readme = flags(&readme_synopsis(command));
        let missing: Vec<_> = help.difference(&readme).collect();
        let extra: Vec<_> = readme.difference(&help).collect();
        if !missing.is_empty() || !extra.is_empty() {
            differences.push(format!("{command}: README lacks {missing:?}, README has {extra:?} that --help does not"));
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}
