//! Drawing with plotters: layout, theme, axes, series and legends.

use std::iter::once;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};

use super::data::{prepare, Prepared, PreparedPanel};
use super::format::{linear_ticks, log_ticks, Ticks};
use super::svg_tags::{Role, Tagger, DASH};
use super::{ChartError, ChartSpec, LineStyle, Rgb, Theme, XAxis, MAX_DIMENSION, MAX_MARKERS};

static FONT_BYTES: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/fonts/DejaVuSans.ttf"
));
static FONT_REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();

/// Registers the embedded DejaVu Sans as plotters' `"sans-serif"` font
/// (normal style; bold/italic fall back to it). Runs once per process (the
/// outcome is cached); every render function calls it, so calling it yourself
/// is only useful to fail early. Note that it replaces any other font a program
/// registered under `"sans-serif"` before.
pub fn register_embedded_font() -> Result<(), ChartError> {
    FONT_REGISTERED
        .get_or_init(|| {
            register_font("sans-serif", FontStyle::Normal, FONT_BYTES)
                .map_err(|_| "DejaVuSans.ttf is not a valid font file".to_string())
        })
        .clone()
        .map_err(ChartError::Font)
}

fn validate(spec: &ChartSpec) -> Result<(), ChartError> {
    let ok = |v: u32| (1..=MAX_DIMENSION).contains(&v);
    if !ok(spec.width) || !ok(spec.height) {
        return Err(ChartError::BadSize {
            width: spec.width,
            height: spec.height,
        });
    }
    if spec.panels.is_empty() {
        return Err(ChartError::EmptySpec);
    }
    Ok(())
}

/// Runs a drawing closure, turning backend errors and panics inside plotters
/// into [`ChartError::Backend`].
fn guarded<E: std::fmt::Display>(f: impl FnOnce() -> Result<(), E>) -> Result<(), ChartError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ChartError::Backend(e.to_string())),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(ChartError::Backend(format!("plotters panicked: {msg}")))
        }
    }
}

pub(crate) fn svg(spec: &ChartSpec) -> Result<String, ChartError> {
    validate(spec)?;
    register_embedded_font()?;
    let prepared = prepare(spec);
    let mut tagger = Tagger::new(true);
    let mut buf = String::new();
    guarded(|| {
        let root = SVGBackend::with_string(&mut buf, (spec.width, spec.height)).into_drawing_area();
        draw_chart(&root, spec, &prepared, &mut tagger)?;
        root.present()
    })?;
    Ok(tagger.apply(&buf))
}

/// Width, height and RGB8 pixels.
pub(crate) fn rgb(spec: &ChartSpec) -> Result<(u32, u32, Vec<u8>), ChartError> {
    validate(spec)?;
    register_embedded_font()?;
    let prepared = prepare(spec);
    let mut tagger = Tagger::new(false);
    let (w, h) = (spec.width, spec.height);
    let mut buf = vec![0u8; w as usize * h as usize * 3];
    guarded(|| {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        draw_chart(&root, spec, &prepared, &mut tagger)?;
        root.present()
    })?;
    Ok((w, h, buf))
}

/// Theme colours.
struct Colors {
    bg: RGBColor,
    text: RGBColor,
    muted: RGBColor,
    axis: RGBColor,
    grid: RGBAColor,
    legend_bg: RGBAColor,
    legend_border: RGBColor,
}

impl Colors {
    fn of(theme: Theme) -> Self {
        let Rgb(r, g, b) = theme.background();
        let bg = RGBColor(r, g, b);
        match theme {
            Theme::Light => Colors {
                bg,
                text: RGBColor(0x22, 0x22, 0x22),
                muted: RGBColor(0x77, 0x77, 0x77),
                axis: RGBColor(0x66, 0x66, 0x66),
                grid: RGBAColor(0, 0, 0, 0.09),
                legend_bg: RGBAColor(0xff, 0xff, 0xff, 0.85),
                legend_border: RGBColor(0xc8, 0xc8, 0xc8),
            },
            Theme::Dark => Colors {
                bg,
                text: RGBColor(0xdc, 0xdc, 0xdc),
                muted: RGBColor(0x9a, 0x9a, 0x9a),
                axis: RGBColor(0x8c, 0x8c, 0x8c),
                grid: RGBAColor(0xff, 0xff, 0xff, 0.11),
                legend_bg: RGBAColor(0x26, 0x26, 0x26, 0.85),
                legend_border: RGBColor(0x55, 0x55, 0x55),
            },
        }
    }
}

/// A linear or logarithmic axis with precomputed ticks (plotters calls it
/// for positions and grid lines; labels come from [`Ticks::label`]).
#[derive(Clone)]
struct AxisCoord {
    lo: f64,
    hi: f64,
    log: bool,
    ticks: Vec<f64>,
}

impl AxisCoord {
    fn new(lo: f64, hi: f64, log: bool, ticks: &Ticks) -> Self {
        AxisCoord {
            lo,
            hi,
            log,
            ticks: ticks.values.clone(),
        }
    }
}

impl Ranged for AxisCoord {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let t = if self.log {
            (value.ln() - self.lo.ln()) / (self.hi.ln() - self.lo.ln())
        } else {
            (value - self.lo) / (self.hi - self.lo)
        };
        let px = limit.0 as f64 + (limit.1 - limit.0) as f64 * t;
        // Far outside values saturate instead of overflowing.
        px.round().clamp(-1e7, 1e7) as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        // Only major ticks; there are no minor grid lines.
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

/// Everything a panel needs besides its data.
struct Ctx<'a> {
    colors: Colors,
    /// Font scale factor.
    s: f64,
    x_axis: XAxis,
    x_range: (f64, f64),
    x_ticks: Ticks,
    tagger: &'a mut Tagger,
}

impl Ctx<'_> {
    fn px(&self, v: f64) -> u32 {
        (v * self.s).round() as u32
    }

    fn font(&self, size: f64, color: RGBColor) -> TextStyle<'static> {
        ("sans-serif", size * self.s).into_font().color(&color)
    }
}

/// Per-panel layout decided before drawing.
struct PanelLayout {
    x_area: u32,
    title_size: f64,
    y_ticks: Ticks,
}

fn draw_chart<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    spec: &ChartSpec,
    prepared: &Prepared,
    tagger: &mut Tagger,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (w, h) = (spec.width as f64, spec.height as f64);
    let s = ((w * h).sqrt() / 700.0).clamp(0.85, 1.6);
    let colors = Colors::of(spec.theme);
    root.fill(&colors.bg)?;
    let px = |v: f64| (v * s).round() as u32;
    let font = |size: f64, color: RGBColor| -> TextStyle<'static> {
        ("sans-serif", size * s).into_font().color(&color)
    };

    let mut area = root.clone();
    if let Some(title) = spec.title.as_deref().filter(|t| !t.is_empty()) {
        let style = ("sans-serif", 16.0 * s, FontStyle::Bold)
            .into_font()
            .color(&colors.text);
        area = area.titled(title, style)?;
    }
    let area = area.margin(px(2.0), px(4.0), px(6.0), px(10.0));
    // Sizes from the pixel range: on a tiny image the area can be inverted.
    let (xr, yr) = area.get_pixel_range();
    let (area_w, area_h) = ((xr.end - xr.start) as f64, (yr.end - yr.start) as f64);
    if area_w < 40.0 || area_h < 30.0 {
        return Ok(()); // too small for axes: background (and title) only
    }

    // Vertical split: the main panel gets 55 % when there are others; the
    // bottom panel additionally gets the room for the x axis description.
    let n = prepared.panels.len();
    let x_area_bottom = px(44.0);
    // Upper panels share the x axis: they show tick labels only when the
    // smallest of them is tall enough, and then all of them do.
    let smallest_upper = match n {
        1 => 0.0,
        2 => (area_h - x_area_bottom as f64) * 0.55,
        _ => (area_h - x_area_bottom as f64) * 0.45 / (n - 1) as f64,
    };
    let x_area_upper = if smallest_upper >= 150.0 * s {
        px(22.0)
    } else {
        0
    };
    let extra = (x_area_bottom - x_area_upper) as f64;
    let avail = area_h - extra;
    if avail < 8.0 * n as f64 {
        return Ok(());
    }
    let mut heights: Vec<f64> = if n == 1 {
        vec![avail]
    } else {
        let main = (avail * 0.55).round();
        once(main)
            .chain((1..n).map(|_| (avail - main) / (n - 1) as f64))
            .collect()
    };
    heights[n - 1] += extra;
    let breaks: Vec<i32> = heights[..n - 1]
        .iter()
        .scan(0.0, |acc, h| {
            *acc += h;
            Some(acc.round() as i32)
        })
        .collect();
    let areas = area.split_by_breakpoints::<i32, i32, _, _>([], breaks);

    // Layout and y ticks of every panel, then one y label area width for all
    // panels so that the plot areas line up.
    let label_style = font(12.0, colors.text);
    let mut layouts = Vec::with_capacity(n);
    let mut widest = 0;
    for (i, (panel, panel_area)) in prepared.panels.iter().zip(&areas).enumerate() {
        let panel_h = panel_area.dim_in_pixel().1 as f64;
        let x_area = if i + 1 == n {
            x_area_bottom
        } else {
            x_area_upper
        };
        let title_size = if i == 0 { 14.0 } else { 13.0 };
        let title_h = root
            .estimate_text_size(&panel.title, &font(title_size, colors.text))?
            .1 as f64
            + 10.0;
        let plot_h = panel_h - title_h - x_area as f64 - 10.0 * s;
        if plot_h < 8.0 {
            return Ok(()); // too small for this many panels: background (and title) only
        }
        let max_count = ((plot_h / (38.0 * s)) as usize).clamp(2, 10);
        let (y0, y1) = panel.y_range;
        let y_ticks = if panel.log_y {
            log_ticks(y0, y1, max_count)
        } else {
            linear_ticks(y0, y1, max_count, false)
        };
        for label in y_ticks.labels() {
            widest = widest.max(root.estimate_text_size(&label, &label_style)?.0);
        }
        layouts.push(PanelLayout {
            x_area,
            title_size,
            y_ticks,
        });
    }
    let y_area = widest + px(34.0);

    let plot_w = area_w - y_area as f64 - 10.0 * s;
    if plot_w < 16.0 {
        return Ok(());
    }
    let (x0, x1) = prepared.x_range;
    let si = match spec.x_axis {
        XAxis::Tokens => true,
        XAxis::Step | XAxis::WallTime => x0.abs().max(x1.abs()) >= 1e5,
    };
    let x_ticks = linear_ticks(x0, x1, ((plot_w / (95.0 * s)) as usize).clamp(2, 12), si);

    let mut ctx = Ctx {
        s,
        colors,
        x_axis: spec.x_axis,
        x_range: prepared.x_range,
        x_ticks,
        tagger,
    };
    for (i, ((panel, panel_area), layout)) in
        prepared.panels.iter().zip(&areas).zip(&layouts).enumerate()
    {
        let bottom = i + 1 == n;
        let mut builder = ChartBuilder::on(panel_area);
        builder
            .margin_top(ctx.px(2.0))
            .margin_bottom(ctx.px(if bottom { 0.0 } else { 6.0 }))
            .margin_left(ctx.px(2.0))
            .margin_right(ctx.px(8.0))
            .caption(&panel.title, ctx.font(layout.title_size, ctx.colors.text))
            .x_label_area_size(layout.x_area)
            .y_label_area_size(y_area);
        let (y0, y1) = panel.y_range;
        let x_coord = AxisCoord::new(x0, x1, false, &ctx.x_ticks);
        let y_coord = AxisCoord::new(y0, y1, panel.log_y, &layout.y_ticks);
        let mut chart = builder.build_cartesian_2d(x_coord, y_coord)?;
        draw_panel(&mut chart, &mut ctx, panel, i, bottom, layout)?;
    }
    Ok(())
}

fn draw_panel<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<AxisCoord, AxisCoord>>,
    ctx: &mut Ctx<'_>,
    panel: &PreparedPanel,
    index: usize,
    bottom: bool,
    layout: &PanelLayout,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let colors = &ctx.colors;
    let (x0, x1) = ctx.x_range;
    let (y0, y1) = panel.y_range;
    let x_fmt = |v: &f64| ctx.x_ticks.label(*v);
    let y_fmt = |v: &f64| layout.y_ticks.label(*v);

    let mut mesh = chart.configure_mesh();
    mesh.bold_line_style(colors.grid)
        .light_line_style(TRANSPARENT)
        .axis_style(colors.axis)
        .label_style(ctx.font(12.0, colors.text))
        .axis_desc_style(ctx.font(12.0, colors.text))
        .x_labels(ctx.x_ticks.values.len())
        .y_labels(layout.y_ticks.values.len())
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .y_desc(panel.y_label.as_str());
    if bottom {
        mesh.x_desc(ctx.x_axis.label());
    }
    mesh.draw()?;

    if panel.series.is_empty() {
        let center = (
            (x0 + x1) / 2.0,
            if panel.log_y {
                (y0 * y1).sqrt()
            } else {
                (y0 + y1) / 2.0
            },
        );
        let style = ctx
            .font(13.0, colors.muted)
            .pos(Pos::new(HPos::Center, VPos::Center));
        chart
            .plotting_area()
            .draw(&Text::new("no data", center, style))?;
        return Ok(());
    }

    let marker_r = ctx.px(3.0).max(2);
    let native = ctx.tagger.native_dash();
    for s in &panel.series {
        let Rgb(r, g, b) = s.color;
        let tagger = &mut *ctx.tagger;
        if let Some(raw) = &s.raw {
            let a = tagger.alpha(0.25, Role::Raw, &s.name, index, false);
            chart.draw_series(once(PathElement::new(
                raw.clone(),
                RGBAColor(r, g, b, a).stroke_width(1),
            )))?;
        }
        let dashed = s.style == LineStyle::Dashed;
        let a = tagger.alpha(1.0, Role::Line, &s.name, index, dashed && native);
        let line_style = RGBAColor(r, g, b, a).stroke_width(2);
        let anno = if native {
            // SVG: one polyline per series (dashes via stroke-dasharray).
            chart.draw_series(once(PathElement::new(s.line.clone(), line_style)))?
        } else if dashed {
            chart.draw_series(DashedLineSeries::new(
                s.line.iter().copied(),
                DASH.0,
                DASH.1,
                line_style,
            ))?
        } else {
            // Bitmap: one quad per segment; a wide polyline is filled as a
            // single polygon, which leaves holes where a noisy line folds back.
            chart.draw_series(
                s.line
                    .windows(2)
                    .map(|w| PathElement::new(vec![w[0], w[1]], line_style)),
            )?
        };
        let (color, style) = (RGBColor(r, g, b), s.style);
        // Legend sample: a 20 px line, dashed or with a marker. Unused parts
        // are fully transparent, which both backends skip.
        anno.label(s.name.as_str()).legend(move |(x, y)| {
            let line = color.stroke_width(2);
            let (first, second, dot) = match style {
                LineStyle::Solid => (20, TRANSPARENT.stroke_width(2), TRANSPARENT.filled()),
                LineStyle::Dashed => (7, line, TRANSPARENT.filled()),
                LineStyle::Markers => (20, TRANSPARENT.stroke_width(2), color.filled()),
            };
            EmptyElement::at((x, y))
                + PathElement::new(vec![(0, 0), (first, 0)], line)
                + PathElement::new(vec![(12, 0), (20, 0)], second)
                + Circle::new((10, 0), 3, dot)
        });

        let markers =
            (s.style == LineStyle::Markers && s.line.len() <= MAX_MARKERS) || s.line.len() == 1;
        if markers {
            let a = tagger.alpha(1.0, Role::Marker, &s.name, index, false);
            let fill = RGBAColor(r, g, b, a).filled();
            chart.draw_series(s.line.iter().map(|&p| Circle::new(p, marker_r, fill)))?;
        }
    }

    // A lone series named like its panel needs no legend: the title says it.
    let redundant = panel.series.len() == 1 && panel.series[0].name == panel.title;
    if !redundant {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .margin(ctx.px(6.0))
            .legend_area_size(ctx.px(28.0))
            .background_style(colors.legend_bg.filled())
            .border_style(colors.legend_border)
            .label_font(ctx.font(12.0, colors.text))
            .draw()?;
    }
    Ok(())
}
