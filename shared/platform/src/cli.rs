//! The command line every binary shares: `--config FILE` (or `IDENTITY_CONFIG`), then one of
//! the binary's own subcommands, none meaning its default (serving).

use clap::{CommandFactory, FromArgMatches, Subcommand};

use crate::settings::ConfigFile;

/// A binary's parsed command line.
pub struct CommandLine<C> {
    pub config: ConfigFile,
    /// `None` when no subcommand was given: the binary's default.
    pub command: Option<C>,
}

/// The command line's definition, to parse with clap: `--config` and `C`'s subcommands.
#[derive(clap::Parser)]
struct Definition<C: Subcommand> {
    #[command(flatten)]
    config: ConfigFile,
    #[command(subcommand)]
    command: Option<C>,
}

impl<C: Subcommand> CommandLine<C> {
    /// Parses the process's arguments for the binary `name`, described by `about`; prints the
    /// help or the error and exits on bad arguments, as clap does.
    pub fn parse(name: &'static str, about: &'static str) -> Self {
        let matches = Definition::<C>::command()
            .name(name)
            .about(about)
            .version(env!("CARGO_PKG_VERSION"))
            .get_matches();
        match Definition::<C>::from_arg_matches(&matches) {
            Ok(Definition { config, command }) => Self { config, command },
            Err(error) => error.exit(),
        }
    }
}
