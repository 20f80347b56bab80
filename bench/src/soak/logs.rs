//! What each process logged at WARN and ERROR.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

/// The log lines of a process at WARN and ERROR, with the first few of them.
pub(super) struct LogScan {
    pub(super) lines: u64,
    pub(super) warnings: u64,
    pub(super) errors: u64,
    pub(super) first: Vec<String>,
}

impl LogScan {
    pub(super) fn of(path: &Path) -> Self {
        let mut scan = LogScan {
            lines: 0,
            warnings: 0,
            errors: 0,
            first: Vec::new(),
        };
        let Ok(file) = File::open(path) else {
            return scan;
        };
        for line in BufReader::new(file).lines().map_while(Result::ok) {
            scan.lines += 1;
            let level = if line.contains(r#""level":"ERROR""#) {
                &mut scan.errors
            } else if line.contains(r#""level":"WARN""#) {
                &mut scan.warnings
            } else {
                continue;
            };
            *level += 1;
            if scan.first.len() < 3 {
                scan.first.push(line.chars().take(400).collect());
            }
        }
        scan
    }

    pub(super) fn print(&self, name: &str) {
        println!(
            "{name} log: {} lines, {} at WARN, {} at ERROR",
            self.lines, self.warnings, self.errors
        );
        for line in &self.first {
            println!("  {line}");
        }
    }
}
