//! The README's command-line section and the agent's command line
//! (`Cli::command()`) name the same flags.

use std::collections::BTreeSet;

use clap::CommandFactory as _;
use overlay_agent::cli::Cli;

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
fn readme_synopsis_and_the_cli_name_the_same_flags() {
    let cli = Cli::command();
    let mut differences = Vec::new();
    for command in ["run", "inspect", "check", "cleanup"] {
        let sub = cli.find_subcommand(command).unwrap_or_else(|| panic!("overlay-agent has no subcommand {command}"));
        let help: BTreeSet<String> = sub.get_arguments().filter_map(|a| a.get_long()).map(|l| format!("--{l}")).filter(|f| f != "--help").collect();
        let readme = flags(&readme_synopsis(command));
        let missing: Vec<_> = help.difference(&readme).collect();
        let extra: Vec<_> = readme.difference(&help).collect();
        if !missing.is_empty() || !extra.is_empty() {
            differences.push(format!("{command}: README lacks {missing:?}, README has {extra:?} that the CLI does not"));
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}
