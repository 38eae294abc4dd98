//! `kiln recipe check|show FILE`: validate a recipe, or print it with every default filled in.

use std::path::PathBuf;

use crate::recipe::Recipe;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Exit 0 when the recipe is valid; otherwise print FILE:LINE:COL and what is wrong.
    Check { file: PathBuf },
    /// Print the resolved recipe (defaults filled in, paths resolved).
    Show { file: PathBuf },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.action {
        Action::Check { file } => {
            let recipe = Recipe::load(&file)?;
            println!("{}: ok ({} run `{}`)", file.display(), format!("{:?}", recipe.method).to_lowercase(), recipe.run.name);
        }
        Action::Show { file } => print!("{}", Recipe::load(&file)?.to_toml()),
    }
    Ok(())
}
