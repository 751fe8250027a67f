//! `--plot`: spend over time, one panel per user, each config's spend in its own colour
//! against the user's budget line (red, dashed) and pace line (grey: the budget spread evenly
//! over the period). Periods roll over: a daily budget's spend falls back to zero each day.

use super::png::Canvas;
use super::render::dollars;
use super::{Run, UserRun};
use crate::config::BudgetPeriod;
use crate::cost::Usd;
use crate::ledger::period;

const WIDTH: i64 = 960;
const PANEL: i64 = 190;
const LEFT: i64 = 20;
const RIGHT: i64 = 20;
const TOP: i64 = 34;
const BOTTOM: i64 = 16;
const TEXT_SCALE: i64 = 2;

const WHITE: [u8; 3] = [255, 255, 255];
const AXIS: [u8; 3] = [120, 120, 120];
const GRID: [u8; 3] = [228, 228, 228];
const BUDGET: [u8; 3] = [214, 39, 40];
const PACE: [u8; 3] = [170, 170, 170];
const TEXT: [u8; 3] = [40, 40, 40];
/// One per config, in command-line order.
pub const SERIES: [[u8; 3]; 4] = [[31, 119, 180], [255, 127, 14], [44, 160, 44], [148, 103, 189]];
pub const SERIES_NAMES: [&str; 4] = ["blue", "orange", "green", "purple"];

/// The chart as a PNG file.
pub fn draw(runs: &[(String, Run)]) -> Vec<u8> {
    let mut users: Vec<&UserRun> = Vec::new();
    for (_, run) in runs {
        for u in &run.users {
            if !users.iter().any(|x| x.user == u.user) {
                users.push(u);
            }
        }
    }
    let span = runs.iter().find_map(|(_, r)| r.span).unwrap_or((0, 1));
    let (t0, t1) = (span.0, span.1.max(span.0 + 1));
    let legend_h = 14 * i64::try_from(runs.len().min(SERIES.len())).unwrap_or(0) + 8;
    let height = legend_h + PANEL * i64::try_from(users.len()).unwrap_or(0).max(1);
    let mut canvas = Canvas::new(usize::try_from(WIDTH).unwrap_or(0), usize::try_from(height).unwrap_or(0), WHITE);
    for (i, (name, _)) in runs.iter().take(SERIES.len()).enumerate() {
        let y = 6 + 14 * i64::try_from(i).unwrap_or(0);
        canvas.fill(LEFT, y + 3, LEFT + 24, y + 7, SERIES[i]);
        text(&mut canvas, LEFT + 32, y, name, TEXT);
    }
    for (p, user) in users.iter().enumerate() {
        let top = legend_h + PANEL * i64::try_from(p).unwrap_or(0);
        let (x0, x1, y0, y1) = (LEFT, WIDTH - RIGHT, top + TOP, top + PANEL - BOTTOM);
        let series: Vec<Option<&UserRun>> =
            runs.iter().map(|(_, r)| r.users.iter().find(|u| u.user == user.user)).collect();
        let peak = series.iter().flatten().flat_map(|u| u.spend.iter().map(|s| s.period)).max().unwrap_or_default();
        let top_usd = user.budget.unwrap_or(peak).max(peak).max(Usd::from_pico(1));
        // 10% headroom above the budget line so it is not drawn on the frame.
        let scale_max = top_usd.saturating_add(top_usd.mul_div(1, 10).unwrap_or_default());
        let x_of = |t: i64| x0 + (t - t0).clamp(0, t1 - t0) * (x1 - x0) / (t1 - t0);
        let y_of = |usd: Usd| {
            let h = usd.min(scale_max).mul_div(y1 - y0, scale_max.pico()).unwrap_or_default().pico();
            y1 - h
        };
        let title = match user.budget {
            Some(b) => format!("{}  budget {} per {}", user.user, dollars(b), period::name(user.period)),
            None => format!("{}  no budget", user.user),
        };
        text(&mut canvas, x0, top + 8, &title, TEXT);
        // Day grid lines.
        let mut day = t0.div_euclid(86_400) * 86_400 + 86_400;
        while day < t1 {
            canvas.line((x_of(day), y0), (x_of(day), y1), GRID, 1, 0);
            day += 86_400;
        }
        canvas.line((x0, y1), (x1, y1), AXIS, 1, 0);
        canvas.line((x0, y0), (x0, y1), AXIS, 1, 0);
        if let Some(budget) = user.budget {
            canvas.line((x0, y_of(budget)), (x1, y_of(budget)), BUDGET, 2, 6);
            pace_line(&mut canvas, user.period, budget, (t0, t1), &x_of, &y_of);
        }
        for (i, run) in series.iter().enumerate().take(SERIES.len()) {
            let Some(run) = run else { continue };
            // A step line: spend holds between requests; a new period drops it back down.
            let mut last = (x0, y1);
            for point in &run.spend {
                let here = (x_of(point.at), y_of(point.period));
                canvas.line(last, (here.0, last.1), SERIES[i], 2, 0);
                canvas.line((here.0, last.1), here, SERIES[i], 2, 0);
                last = here;
            }
            canvas.line(last, (x1, last.1), SERIES[i], 2, 0);
        }
    }
    canvas.encode()
}

/// The budget spread evenly over each period the trace covers (none for `total` budgets).
fn pace_line(
    canvas: &mut Canvas,
    budget_period: BudgetPeriod,
    budget: Usd,
    (t0, t1): (i64, i64),
    x_of: &dyn Fn(i64) -> i64,
    y_of: &dyn Fn(Usd) -> i64,
) {
    let mut start = period::start(budget_period, t0);
    while start < t1 {
        let Some(end) = period::end(budget_period, start) else { return };
        let (a, b) = (start.max(t0), end.min(t1));
        let at = |t: i64| budget.mul_div(t - start, end - start).unwrap_or_default();
        canvas.line((x_of(a), y_of(at(a))), (x_of(b), y_of(at(b))), PACE, 1, 3);
        start = end;
    }
}

/// 3×5 glyphs, rows top to bottom; lowercase is drawn as uppercase.
const FONT: &[(char, &str)] = &[
    ('0', "111101101101111"),
    ('1', "010110010010111"),
    ('2', "111001111100111"),
    ('3', "111001111001111"),
    ('4', "101101111001001"),
    ('5', "111100111001111"),
    ('6', "111100111101111"),
    ('7', "111001001001001"),
    ('8', "111101111101111"),
    ('9', "111101111001111"),
    ('A', "010101111101101"),
    ('B', "110101110101110"),
    ('C', "011100100100011"),
    ('D', "110101101101110"),
    ('E', "111100110100111"),
    ('F', "111100110100100"),
    ('G', "011100101101011"),
    ('H', "101101111101101"),
    ('I', "111010010010111"),
    ('J', "001001001101010"),
    ('K', "101101110101101"),
    ('L', "100100100100111"),
    ('M', "101111111101101"),
    ('N', "110101101101101"),
    ('O', "010101101101010"),
    ('P', "110101110100100"),
    ('Q', "010101101110011"),
    ('R', "110101110101101"),
    ('S', "011100010001110"),
    ('T', "111010010010010"),
    ('U', "101101101101111"),
    ('V', "101101101101010"),
    ('W', "101101111111101"),
    ('X', "101101010101101"),
    ('Y', "101101010010010"),
    ('Z', "111001010100111"),
    ('-', "000000111000000"),
    ('.', "000000000000010"),
    ('$', "011110010011110"),
    ('/', "001001010100100"),
    (':', "000010000010000"),
    ('_', "000000000000111"),
    ('+', "000010111010000"),
    ('%', "101001010100101"),
    ('(', "010100100100010"),
    (')', "010001001001010"),
];

fn text(canvas: &mut Canvas, x: i64, y: i64, s: &str, color: [u8; 3]) {
    let mut cx = x;
    for ch in s.chars() {
        let upper = ch.to_ascii_uppercase();
        if let Some((_, bits)) = FONT.iter().find(|(c, _)| *c == upper) {
            for (i, bit) in bits.bytes().enumerate() {
                if bit == b'1' {
                    let (col, row) = (i64::try_from(i % 3).unwrap_or(0), i64::try_from(i / 3).unwrap_or(0));
                    let (px, py) = (cx + col * TEXT_SCALE, y + row * TEXT_SCALE);
                    canvas.fill(px, py, px + TEXT_SCALE, py + TEXT_SCALE, color);
                }
            }
        }
        cx += 4 * TEXT_SCALE;
    }
}
