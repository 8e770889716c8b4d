//! What `qlora train` shows: the summary before training, the progress (a bar on a
//! terminal, plain lines on stderr otherwise) and the before/after samples.

use std::path::Path;

use qlora_dist::Communicator;
use qlora_tokenizer::Tokenizer;
use qlora_train::launch::{Base, TrainRequest};
use qlora_train::session::RunView;
use qlora_train::{Callbacks, PreparedData, RunReport, StepMetrics, Trainer};

/// The summary before training: processes (when several), model, device, adapter,
/// data and schedule.
pub fn print_summary(
    trainer: &Trainer<'_>,
    req: &TrainRequest,
    base: &Base,
    data: &PreparedData,
    comm: &dyn Communicator,
) {
    let world = comm.size();
    if world > 1 {
        let (b, acc) = (trainer.cfg.batch_size, trainer.cfg.grad_accum);
        let shard = match trainer.model.shard_spec() {
            Some(s) => format!(
                "shard full (this process holds {:.1} MiB of the layers' weights, 1/{})",
                trainer.model.shard_bytes() as f64 / (1 << 20) as f64,
                s.size
            ),
            None => "shard none".to_string(),
        };
        println!(
            "parallel   {world} processes ({}), data parallel: {b} rows per process per micro-batch, {} per step; {shard}",
            comm.backend(),
            b * acc * world
        );
    }
    let (t, c, model) = (&trainer.adapter, &trainer.cfg, trainer.model);
    let (packing, max_len) = (req.packing, req.max_seq_len());
    let trainable = t.num_params();
    let base_params = qlora_memory::inventory::formula_params(&model.config) as usize;
    let mib = model.weight_bytes() as f64 / (1 << 20) as f64;
    println!(
        "model      {} (loaded in {:.1}s, base weights {}, {mib:.1} MiB in memory)",
        req.model, base.load_s, base.loaded.quant
    );
    println!("device     {}", model.device_description());
    println!(
        "adapter    {}r={} alpha={} scaling={} dropout={} on {} modules: {} trainable params ({:.3}% of {})",
        if t.config.use_dora { "DoRA " } else { "" },
        t.config.r,
        t.config.lora_alpha,
        t.scaling(),
        c.lora_dropout,
        t.layers.len(),
        trainable,
        100.0 * trainable as f64 / (base_params + trainable) as f64,
        base_params
    );
    println!(
        "data       {} training examples in {} rows{}, {} eval examples; {} truncated to {max_len} tokens; {} bad records skipped",
        data.train_examples,
        trainer.num_rows(),
        if packing { " (packed)" } else { "" },
        trainer.eval_rows.len(),
        data.truncated,
        data.skipped_train
    );
    println!(
        "schedule   {} steps x {} rows ({}x{} accum), lr {} {:?} warmup {}, clip {:?}, checkpointing {}",
        c.max_steps,
        c.batch_size * c.grad_accum,
        c.batch_size,
        c.grad_accum,
        c.lr,
        c.schedule,
        c.warmup_steps,
        c.max_grad_norm,
        c.checkpointing
    );
    if trainer.step > 0 {
        println!("resuming   at step {}", trainer.step);
    }
}

/// The loss curve (`out/loss.svg`), then the line after training: steps, final
/// loss and where everything was written.
pub fn print_done(trainer: &Trainer<'_>, report: &RunReport, out: &Path) {
    let plot = out.join("loss.svg");
    if let Err(e) = crate::plot::loss_curve(&report.history, &plot) {
        eprintln!("warning: could not draw the loss curve: {e:#}");
    }
    println!(
        "done       {} steps; final train loss {}; adapter in {}; metrics in {}; loss curve {}",
        trainer.step,
        report
            .history
            .last()
            .map(|m| format!("{:.4}", m.loss))
            .unwrap_or_default(),
        report.adapter_dir.display(),
        report.metrics_path.display(),
        plot.display()
    );
}

/// Each held-out prompt with its greedy continuation before and after training.
pub fn print_samples(tok: &Tokenizer, prompts: &[Vec<u32>], before: &[String], after: &[String]) {
    for ((p, b), a) in prompts.iter().zip(before).zip(after) {
        let prompt = tok.decode(p, false).unwrap_or_default();
        println!(
            "prompt: {}\n  before: {b}\n  after:  {a}",
            prompt.trim_end()
        );
    }
}

/// A progress bar on a terminal; plain lines on stderr otherwise (a hidden bar would
/// swallow them, and the eval loss is what a log reader wants).
pub struct Progress {
    pub bar: indicatif::ProgressBar,
    show: bool,
}

impl Progress {
    pub fn new(trainer: &Trainer<'_>, wanted: bool) -> Self {
        let show = wanted && std::io::IsTerminal::is_terminal(&std::io::stderr());
        let bar = indicatif::ProgressBar::new(trainer.cfg.max_steps);
        if show {
            let style = "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}";
            bar.set_style(indicatif::ProgressStyle::with_template(style).unwrap());
            bar.set_position(trainer.step);
        } else {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        Progress { bar, show }
    }

    fn say(&self, msg: String) {
        if self.show {
            self.bar.println(msg);
        } else {
            eprintln!("{msg}");
        }
    }
}

impl Callbacks for Progress {
    fn on_eval(&mut self, step: u64, l: f64, p: f64) {
        if step == 0 {
            self.say(format!(
                "eval before training: loss {l:.4}, perplexity {p:.2}"
            ));
        } else {
            self.say(format!("step {step}: eval loss {l:.4}, perplexity {p:.2}"));
        }
    }

    fn on_optimizer_step(&mut self, step: u64) {
        qlora_memory::rss::trace(&format!("step-{step}"));
    }

    fn on_step(&mut self, m: &StepMetrics, max_steps: u64) {
        self.bar.set_position(m.step);
        let msg = format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s",
            m.loss, m.lr, m.tokens_per_s
        );
        self.bar.set_message(msg);
        if !self.show {
            eprintln!(
                "step {}/{max_steps}: loss {:.4} grad_norm {:.4} lr {:.3e} {:.0} tok/s",
                m.step, m.loss, m.grad_norm, m.lr, m.tokens_per_s
            );
        }
    }
}

/// `qlora train`'s terminal output (rank 0; skipped lines and the memory trace on every
/// rank): notes and skipped lines on stderr, the summary, progress, results and samples.
pub struct TerminalView {
    wanted: bool,
    progress: Option<Progress>,
}

impl TerminalView {
    pub fn new(progress_bar: bool) -> Self {
        TerminalView {
            wanted: progress_bar,
            progress: None,
        }
    }
}

impl RunView for TerminalView {
    /// QLORA_MEM_TRACE=1|reset: resident memory at phase boundaries (plan validation).
    fn phase(&mut self, name: &str) {
        qlora_memory::rss::trace(name);
    }
    fn note(&mut self, note: &str) {
        eprintln!("note: {note}");
    }
    fn skipped(&mut self, what: &str) {
        eprintln!("skipped {what}");
    }
    fn summary(
        &mut self,
        trainer: &Trainer<'_>,
        req: &TrainRequest,
        base: &Base,
        data: &PreparedData,
        comm: &dyn Communicator,
    ) {
        print_summary(trainer, req, base, data, comm);
    }
    fn callbacks(&mut self, trainer: &Trainer<'_>) -> &mut dyn Callbacks {
        self.progress.insert(Progress::new(trainer, self.wanted))
    }
    fn done(&mut self, trainer: &Trainer<'_>, report: &RunReport, out: &Path) {
        if let Some(p) = self.progress.take() {
            p.bar.finish_and_clear();
        }
        print_done(trainer, report, out);
    }
    fn samples(
        &mut self,
        tok: &Tokenizer,
        prompts: &[Vec<u32>],
        before: &[String],
        after: &[String],
    ) {
        print_samples(tok, prompts, before, after);
    }
    fn info(&mut self, line: &str) {
        println!("{line}");
    }
}
