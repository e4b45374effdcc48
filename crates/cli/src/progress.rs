//! Progress bars on stderr: model pulls and other long work.

use indicatif::{ProgressBar, ProgressStyle};
use kith_models::PullEvent;

/// Turns pull events into an indicatif bar (hidden when stderr is not a terminal).
#[derive(Default)]
pub(crate) struct PullProgress {
    bar: Option<ProgressBar>,
}

impl PullProgress {
    pub(crate) fn on_event(&mut self, event: PullEvent) {
        match event {
            PullEvent::SourceStarted { source } => eprintln!("pulling from {source}"),
            PullEvent::SourceFailed { source, reason } => {
                self.finish();
                eprintln!("  {source} failed: {reason}");
            }
            PullEvent::Downloading { what } => eprintln!("  downloading {what}"),
            PullEvent::FileStarted { file, size } => {
                self.finish();
                let bar = ProgressBar::new(size);
                let style =
                    ProgressStyle::with_template("  {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                        .map(|s| s.progress_chars("=> "))
                        .unwrap_or_else(|_| ProgressStyle::default_bar());
                bar.set_style(style);
                bar.set_message(format!("verifying {file}"));
                self.bar = Some(bar);
            }
            PullEvent::FileProgress { done } => {
                if let Some(bar) = &self.bar {
                    bar.set_position(done);
                }
            }
            PullEvent::FileDone { file } => {
                self.finish();
                eprintln!("  {file}: sha256 verified");
            }
            _ => {}
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// A bar counting items of long work (hidden when stderr is not a terminal).
pub(crate) fn count_bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template("  [{bar:30}] {pos}/{len} {msg} {per_sec} eta {eta}")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(what.to_owned());
    bar
}
