//! `--plot`: spend over time, one panel per user, each config's spend in its own colour
//! against the user's budget line (red, dashed) and pace line (grey: the budget spread evenly
//! over the period). Periods roll over: a daily budget's spend falls back to zero each day.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

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

/// Users drawn in a panel of their own at most. A trace exported from a ledger of API users
/// names hundreds of thousands (a panel each would be a canvas of tens of gigabytes): past
/// this, the chart is everyone's spend together, then the users who spent the most.
pub const MAX_USER_PANELS: usize = 12;

/// What the chart shows.
#[derive(Debug, Clone)]
pub struct Chart {
    pub canvas: Canvas,
    /// Users in the trace (of any config's run).
    pub users: usize,
    /// Of them, those with a panel of their own (all of them up to [`MAX_USER_PANELS`]).
    pub drawn: usize,
}

impl Chart {
    /// How the chart's legend reads on the command line.
    pub fn legend(&self, runs: &[(String, Run)]) -> String {
        let colours: Vec<String> =
            runs.iter().zip(SERIES_NAMES).map(|((name, _), colour)| format!("{name} {colour}")).collect();
        let selection = if self.drawn < self.users {
            format!("all {} users together, then the {} who spent the most; ", self.users, self.drawn)
        } else {
            String::new()
        };
        format!("{selection}{}; budget red dashed, pace grey", colours.join(", "))
    }
}

/// A panel's frame: its plot area and the trace's span on the x axis.
struct Frame {
    x0: i64,
    x1: i64,
    y0: i64,
    y1: i64,
    t0: i64,
    t1: i64,
}

impl Frame {
    fn at(top: i64, (t0, t1): (i64, i64)) -> Self {
        Self { x0: LEFT, x1: WIDTH - RIGHT, y0: top + TOP, y1: top + PANEL - BOTTOM, t0, t1 }
    }

    fn x_of(&self, t: i64) -> i64 {
        self.x0 + (t - self.t0).clamp(0, self.t1 - self.t0) * (self.x1 - self.x0) / (self.t1 - self.t0)
    }

    /// The y of `usd` on a scale up to `top_usd`, with 10% headroom so that a budget line is
    /// not drawn on the frame.
    fn y_scale(&self, top_usd: Usd) -> impl Fn(Usd) -> i64 + '_ {
        let top_usd = top_usd.max(Usd::from_pico(1));
        let scale_max = top_usd.saturating_add(top_usd.mul_div(1, 10).unwrap_or_default());
        move |usd: Usd| {
            self.y1 - usd.min(scale_max).mul_div(self.y1 - self.y0, scale_max.pico()).unwrap_or_default().pico()
        }
    }

    /// Title, day grid and axes.
    fn draw(&self, canvas: &mut Canvas, title: &str) {
        text(canvas, self.x0, self.y0 - TOP + 8, title, TEXT);
        let mut day = self.t0.div_euclid(86_400) * 86_400 + 86_400;
        while day < self.t1 {
            canvas.line((self.x_of(day), self.y0), (self.x_of(day), self.y1), GRID, 1, 0);
            day += 86_400;
        }
        canvas.line((self.x0, self.y1), (self.x1, self.y1), AXIS, 1, 0);
        canvas.line((self.x0, self.y0), (self.x0, self.y1), AXIS, 1, 0);
    }

    /// A step line through `points` (x, y): the value holds until the next point.
    fn step_line(&self, canvas: &mut Canvas, points: impl Iterator<Item = (i64, i64)>, color: [u8; 3]) {
        let mut last = (self.x0, self.y1);
        for here in points {
            canvas.line(last, (here.0, last.1), color, 2, 0);
            canvas.line((here.0, last.1), here, color, 2, 0);
            last = here;
        }
        canvas.line(last, (self.x1, last.1), color, 2, 0);
    }
}

/// The users with a panel of their own, in order, and how many users the runs have: all of
/// them in first-seen order, or past [`MAX_USER_PANELS`] those who spent the most (in any
/// config), most first.
pub fn panel_users(runs: &[(String, Run)]) -> (Vec<&UserRun>, usize) {
    let mut users: Vec<&UserRun> = Vec::new();
    let mut most: HashMap<&str, Usd> = HashMap::new();
    for (_, run) in runs {
        for u in &run.users {
            match most.entry(&u.user) {
                Entry::Vacant(v) => {
                    v.insert(u.spent);
                    users.push(u);
                }
                Entry::Occupied(mut o) => *o.get_mut() = u.spent.max(*o.get()),
            }
        }
    }
    let all = users.len();
    if all > MAX_USER_PANELS {
        users.sort_by(|a, b| most[b.user.as_str()].cmp(&most[a.user.as_str()]).then_with(|| a.user.cmp(&b.user)));
        users.truncate(MAX_USER_PANELS);
    }
    (users, all)
}

/// The chart: a panel per user, or, with more than [`MAX_USER_PANELS`] users, everyone's
/// spend together and then the users who spent the most.
pub fn draw(runs: &[(String, Run)]) -> Chart {
    let (users, total_users) = panel_users(runs);
    let by_name: Vec<HashMap<&str, &UserRun>> = runs.iter().map(|(_, r)| r.by_name()).collect();
    let together = users.len() < total_users;
    let span = runs.iter().find_map(|(_, r)| r.span).unwrap_or((0, 1));
    let span = (span.0, span.1.max(span.0 + 1));
    let legend_h = 14 * i64::try_from(runs.len().min(SERIES.len())).unwrap_or(0) + 8;
    let panels = i64::try_from(users.len() + usize::from(together)).unwrap_or(0).max(1);
    let height = legend_h + PANEL * panels;
    let mut canvas = Canvas::new(usize::try_from(WIDTH).unwrap_or(0), usize::try_from(height).unwrap_or(0), WHITE);
    for (i, (name, _)) in runs.iter().take(SERIES.len()).enumerate() {
        let y = 6 + 14 * i64::try_from(i).unwrap_or(0);
        canvas.fill(LEFT, y + 3, LEFT + 24, y + 7, SERIES[i]);
        text(&mut canvas, LEFT + 32, y, name, TEXT);
    }
    let mut top = legend_h;
    if together {
        everyone(&mut canvas, &Frame::at(top, span), runs, total_users);
        top += PANEL;
    }
    for user in &users {
        let frame = Frame::at(top, span);
        top += PANEL;
        let series: Vec<Option<&UserRun>> = by_name.iter().map(|m| m.get(user.user.as_str()).copied()).collect();
        let peak = series.iter().flatten().flat_map(|u| u.spend.iter().map(|s| s.period)).max().unwrap_or_default();
        let y_of = frame.y_scale(user.budget.unwrap_or(peak).max(peak));
        let title = match user.budget {
            Some(b) => format!("{}  budget {} per {}", user.user, dollars(b), period::name(user.period)),
            None => format!("{}  no budget", user.user),
        };
        frame.draw(&mut canvas, &title);
        if let Some(budget) = user.budget {
            canvas.line((frame.x0, y_of(budget)), (frame.x1, y_of(budget)), BUDGET, 2, 6);
            pace_line(&mut canvas, user.period, budget, span, &|t| frame.x_of(t), &y_of);
        }
        for (i, run) in series.iter().enumerate().take(SERIES.len()) {
            // Spend in the period: a new period drops it back down.
            if let Some(run) = run {
                let points = run.spend.iter().map(|p| (frame.x_of(p.at), y_of(p.period)));
                frame.step_line(&mut canvas, points, SERIES[i]);
            }
        }
    }
    Chart { canvas, users: total_users, drawn: users.len() }
}

/// The panel of every user's spend added up over the whole trace, one line per config.
fn everyone(canvas: &mut Canvas, frame: &Frame, runs: &[(String, Run)], users: usize) {
    // Each config's running total at the last request of each pixel column: a line per request
    // of a hundred thousand users would draw the same columns over and over.
    let columns = usize::try_from(frame.x1 - frame.x0 + 1).unwrap_or(1);
    let totals: Vec<Vec<Option<Usd>>> = runs
        .iter()
        .take(SERIES.len())
        .map(|(_, run)| {
            let mut added: Vec<(i64, Usd)> = Vec::new();
            for user in &run.users {
                let mut before = Usd::ZERO;
                for point in &user.spend {
                    added.push((point.at, point.total.saturating_sub(before)));
                    before = point.total;
                }
            }
            added.sort_by_key(|(at, _)| *at);
            let mut column_total = vec![None; columns];
            let mut sum = Usd::ZERO;
            for (at, usd) in added {
                sum = sum.saturating_add(usd);
                let column = usize::try_from(frame.x_of(at) - frame.x0).unwrap_or(0).min(columns - 1);
                column_total[column] = Some(sum);
            }
            column_total
        })
        .collect();
    let peak = totals.iter().flatten().flatten().max().copied().unwrap_or_default();
    let y_of = frame.y_scale(peak);
    frame.draw(canvas, &format!("all {users} users  spend over the trace  {} at most", dollars(peak)));
    for (i, column_total) in totals.iter().enumerate() {
        let points = (frame.x0..).zip(column_total).filter_map(|(x, total)| total.map(|usd| (x, y_of(usd))));
        frame.step_line(canvas, points, SERIES[i]);
    }
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
