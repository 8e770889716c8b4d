//! The loss curve of `qlora train` (SVG): train loss per step, eval loss where measured.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use qlora_train::StepMetrics;

pub fn loss_curve(history: &[StepMetrics], path: &Path) -> Result<()> {
    if history.is_empty() {
        return Ok(());
    }
    let train: Vec<(f64, f64)> = history.iter().map(|m| (m.step as f64, m.loss)).collect();
    let eval: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|m| m.eval_loss.map(|l| (m.step as f64, l)))
        .collect();
    let all = train.iter().chain(&eval).map(|p| p.1);
    let (lo, hi) = all.fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let xmax = history.last().unwrap().step.max(2) as f64;
    let tmp = path.with_extension("svg.tmp");
    {
        let root = SVGBackend::new(&tmp, (800, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("qlora train: loss", ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(1f64..xmax, (lo - pad)..(hi + pad))?;
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc("cross-entropy")
            .draw()?;
        chart
            .draw_series(LineSeries::new(train, &BLUE))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        if !eval.is_empty() {
            chart
                .draw_series(LineSeries::new(eval.clone(), &RED))?
                .label("eval")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
            chart.draw_series(eval.iter().map(|&p| Circle::new(p, 3, RED.filled())))?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()?;
        root.present()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
