//! Training-metric charts (loss curves, learning rate, grad norm, throughput)
//! rendered to SVG or PNG with `plotters`.
//!
//! # Overview
//!
//! A [`ChartSpec`] describes a figure: an optional title and one or more
//! [`Panel`]s stacked vertically that share one x axis ([`XAxis`]). Each panel
//! holds [`Series`] of `(x, y)` points. Render it with [`render_svg`],
//! [`render_png`], [`render_rgb`] (raw pixels for a UI texture) or
//! [`render_to_file`]. [`run_chart`] and [`compare_chart`] build the two specs
//! the app uses.
//!
//! # Data pipeline (per series, before drawing)
//!
//! 1. Points whose x or y is NaN/±inf are dropped; on a `log_y` panel points
//!    with `y <= 0` are dropped too.
//! 2. Axis ranges are computed from *all* remaining raw points (x shared by all
//!    panels, y per panel), padded by a small margin; degenerate ranges (a
//!    single point, a constant series, no data) are expanded so they draw.
//! 3. If `spec.smoothing > 0`, the smoothed line is the TensorBoard-style
//!    debiased EMA ([`ema`]) of the raw points, **and the raw line is drawn
//!    too, faint (25 % opacity, 1 px) underneath**. With `smoothing == 0` only
//!    the raw line is drawn.
//! 4. Every drawn line is downsampled with LTTB ([`lttb`]) to at most
//!    `spec.max_points` points (0 means [`DEFAULT_MAX_POINTS`]), so the cost of
//!    drawing does not depend on the length of the input.
//!
//! # Layout
//!
//! Panels are stacked top to bottom and share the x range (union of all
//! panels) and the width of the y label area, so their plot areas line up. With
//! more than one panel the first gets 55 % of the height and the others share
//! the rest. The x axis description ([`XAxis::label`]) is drawn under the bottom
//! panel only; upper panels show x tick labels only when each of them is at
//! least ~150 px tall (otherwise only the grid). Every panel has its title
//! above it, its y description on the left and a legend (series names, on a
//! semi-transparent box) in its upper-right corner, except a panel whose only
//! series has the same name as the panel title (the title already names it:
//! [`run_chart`]'s secondary panels). Fonts scale with the image size; an
//! image too small to hold the axes (less than ~100 px high for one panel,
//! ~300 px for [`run_chart`]'s four, or less than ~80 px wide) contains only
//! the background and the title.
//!
//! `LineStyle::Markers` draws the line plus a filled circle on every point
//! (only while the line has at most [`MAX_MARKERS`] points after
//! downsampling; above that only the line). A series with a single point always
//! gets a marker so that it is visible.
//!
//! # SVG structure (what tests and the UI can rely on)
//!
//! The SVG is well-formed XML (root `<svg>` with `width`/`height`/`viewBox`).
//! The background is the first `<rect>`, filled with the theme background
//! (`#FFFFFF` for [`Theme::Light`], `#1E1E1E` for [`Theme::Dark`]).
//! Series elements carry extra attributes, nothing else does:
//!
//! * every drawn series line is exactly **one** `<polyline class="series">`
//!   (also for [`LineStyle::Dashed`], which gets a `stroke-dasharray`), with
//!   `stroke` = the series colour as upper-case `#RRGGBB`, `data-series` = the
//!   series name and `data-panel` = the panel index (0-based, in
//!   `spec.panels` order);
//! * the faint raw line drawn under a smoothed line (only when
//!   `smoothing > 0`) is one `<polyline class="series-raw">` with the same
//!   `data-series`/`data-panel`;
//! * markers are `<circle class="series-marker">` with the same data attributes.
//!
//! So *the number of `polyline` elements with `class="series"` equals the
//! number of series that have at least one drawable point*. Other polylines
//! (grid lines, ticks, legend samples) have no `class`. Every text (titles,
//! axis descriptions, tick labels, legend entries) is a `<text>` element whose
//! content is the string (plotters appends a newline, so trim it). Legend entries
//! are the series names; axis descriptions are [`XAxis::label`] (bottom panel
//! only) and [`Panel::y_label`] (every panel); panel titles are
//! [`Panel::title`].
//!
//! # PNG
//!
//! PNG output is rasterised by plotters' bitmap backend into an RGB8 buffer of
//! exactly `width × height` and encoded by a small built-in PNG/zlib encoder
//! (no extra dependency). Lines are drawn segment by segment there (a wide
//! polyline is filled as one polygon by plotters, which leaves holes where a
//! noisy line folds back). Text uses DejaVu Sans, embedded in the binary and
//! registered once (see [`register_embedded_font`]); every render function
//! calls it, so nothing needs to be done by the caller. plotters 0.3.7 places
//! bitmap glyphs without their left side bearing, so PNG letter spacing is
//! slightly uneven at small sizes; SVG text is unaffected.

mod data;
mod format;
mod palette;
mod png;
mod render;
mod svg_tags;

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub use data::{ema, lttb};
pub use palette::{palette_color, stable_color, PALETTE};
pub use render::register_embedded_font;

/// Default for [`ChartSpec::max_points`].
pub const DEFAULT_MAX_POINTS: usize = 2000;
/// Largest accepted width or height in pixels.
pub const MAX_DIMENSION: u32 = 8192;
/// A [`LineStyle::Markers`] series draws its markers only while it has at most
/// this many points after downsampling.
pub const MAX_MARKERS: usize = 300;

/// An sRGB colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rgb(pub u8, pub u8, pub u8);

impl Rgb {
    /// `#rrggbb`, lower case.
    pub fn to_hex(self) -> String {
        format!("#{:02x}{:02x}{:02x}", self.0, self.1, self.2)
    }

    /// Parses `#rrggbb` or `rrggbb` (any case).
    pub fn from_hex(s: &str) -> Option<Self> {
        let s = s.strip_prefix('#').unwrap_or(s);
        if s.len() != 6 || !s.is_ascii() {
            return None;
        }
        let c = |i: usize| u8::from_str_radix(&s[i..i + 2], 16).ok();
        Some(Rgb(c(0)?, c(2)?, c(4)?))
    }
}

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum LineStyle {
    /// A solid 2 px line.
    #[default]
    Solid,
    /// A dashed 2 px line.
    Dashed,
    /// A solid line with a filled circle on every point (e.g. validation loss).
    Markers,
}

/// One named line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    /// Shown in the legend.
    pub name: String,
    /// Line colour.
    pub color: Rgb,
    /// `(x, y)` points, normally sorted by x.
    pub points: Vec<(f64, f64)>,
    /// Solid, dashed or with point markers.
    #[serde(default)]
    pub style: LineStyle,
}

impl Series {
    /// A solid series.
    pub fn new(name: impl Into<String>, color: Rgb, points: Vec<(f64, f64)>) -> Self {
        Series {
            name: name.into(),
            color,
            points,
            style: LineStyle::Solid,
        }
    }

    /// Same series with another style.
    pub fn with_style(mut self, style: LineStyle) -> Self {
        self.style = style;
        self
    }
}

/// One plot area with its own y axis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Panel {
    /// Caption drawn above the plot area.
    pub title: String,
    /// Y axis description.
    pub y_label: String,
    /// The lines drawn in this panel.
    pub series: Vec<Series>,
    /// Logarithmic y axis (non-positive values are dropped).
    #[serde(default)]
    pub log_y: bool,
}

impl Panel {
    /// A linear panel without series.
    pub fn new(title: impl Into<String>, y_label: impl Into<String>) -> Self {
        Panel {
            title: title.into(),
            y_label: y_label.into(),
            series: Vec::new(),
            log_y: false,
        }
    }
}

/// Colour theme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, ts_rs::TS)]
pub enum Theme {
    /// White background, dark text.
    #[default]
    Light,
    /// `#1E1E1E` background, light text.
    Dark,
}

impl Theme {
    /// The background colour the renderer fills the image with.
    pub fn background(self) -> Rgb {
        match self {
            Theme::Light => Rgb(0xff, 0xff, 0xff),
            Theme::Dark => Rgb(0x1e, 0x1e, 0x1e),
        }
    }
}

/// What the shared x axis measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, ts_rs::TS)]
pub enum XAxis {
    /// Optimiser step.
    #[default]
    Step,
    /// Tokens seen; ticks use k/M/B/T suffixes.
    Tokens,
    /// Seconds since the start of the run.
    WallTime,
}

impl XAxis {
    /// Axis description: `"step"`, `"tokens"` or `"wall time (s)"`.
    pub fn label(self) -> &'static str {
        match self {
            XAxis::Step => "step",
            XAxis::Tokens => "tokens",
            XAxis::WallTime => "wall time (s)",
        }
    }
}

/// A complete figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChartSpec {
    /// Figure title drawn at the top, if any.
    pub title: Option<String>,
    /// Stacked top to bottom. With more than one panel the first one is the
    /// main panel and gets 55 % of the height; the others share the rest
    /// equally.
    pub panels: Vec<Panel>,
    /// What the x values are (steps, tokens, seconds).
    pub x_axis: XAxis,
    /// Pixels, 1..=[`MAX_DIMENSION`].
    pub width: u32,
    /// Pixels, 1..=[`MAX_DIMENSION`].
    pub height: u32,
    /// Light or dark colours.
    pub theme: Theme,
    /// TensorBoard-style EMA weight in `[0, 1)`; 0 (or anything not in
    /// `(0, 1)`) turns smoothing off; values are clamped to 0.999.
    pub smoothing: f64,
    /// Upper bound of points drawn per line (LTTB); 0 means
    /// [`DEFAULT_MAX_POINTS`].
    pub max_points: usize,
}

impl Default for ChartSpec {
    fn default() -> Self {
        ChartSpec {
            title: None,
            panels: Vec::new(),
            x_axis: XAxis::Step,
            width: 1000,
            height: 700,
            theme: Theme::Light,
            smoothing: 0.0,
            max_points: DEFAULT_MAX_POINTS,
        }
    }
}

/// Output image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ImageFormat {
    /// Scalable vector graphics (the UI's format).
    Svg,
    /// PNG bitmap (export).
    Png,
}

impl ImageFormat {
    /// From the file extension (`.svg` / `.png`, any case).
    pub fn from_path(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "svg" => Some(ImageFormat::Svg),
            "png" => Some(ImageFormat::Png),
            _ => None,
        }
    }

    /// `"svg"` or `"png"`.
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Svg => "svg",
            ImageFormat::Png => "png",
        }
    }
}

/// Everything that can go wrong while rendering.
#[derive(thiserror::Error, Debug)]
pub enum ChartError {
    /// No panels.
    #[error("chart has nothing to draw: the spec contains no panels")]
    EmptySpec,
    #[error(
        "invalid chart size {width}x{height}: width and height must be between 1 and {} pixels",
        MAX_DIMENSION
    )]
    /// Width or height out of range.
    BadSize {
        /// Requested width.
        width: u32,
        /// Requested height.
        height: u32,
    },
    /// plotters failed.
    #[error("chart drawing backend error: {0}")]
    Backend(String),
    /// The embedded font could not be registered.
    #[error("cannot load the embedded chart font: {0}")]
    Font(String),
    /// Writing the image failed.
    #[error("cannot write chart image {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file name's extension is neither .svg nor .png.
    #[error(
        "cannot choose an image format for {}: the file name must end in .svg or .png",
        path.display()
    )]
    UnknownFormat {
        /// The file.
        path: PathBuf,
    },
}

/// Renders the chart as an SVG document.
pub fn render_svg(spec: &ChartSpec) -> Result<String, ChartError> {
    render::svg(spec)
}

/// Renders the chart as PNG file bytes of exactly `width × height` pixels.
pub fn render_png(spec: &ChartSpec) -> Result<Vec<u8>, ChartError> {
    let (w, h, rgb) = render::rgb(spec)?;
    Ok(png::encode_rgb8(w, h, &rgb))
}

/// Renders the chart into raw pixels: `width * height * 3` bytes, RGB8, rows
/// top to bottom (e.g. for a UI texture, without a PNG round trip).
pub fn render_rgb(spec: &ChartSpec) -> Result<Vec<u8>, ChartError> {
    Ok(render::rgb(spec)?.2)
}

/// Renders the chart in the given format (SVG as UTF-8 bytes).
pub fn render_image(spec: &ChartSpec, format: ImageFormat) -> Result<Vec<u8>, ChartError> {
    match format {
        ImageFormat::Svg => render_svg(spec).map(String::into_bytes),
        ImageFormat::Png => render_png(spec),
    }
}

/// Renders the chart and writes it to `path`; the format comes from the
/// extension (`.svg` or `.png`).
pub fn render_to_file(spec: &ChartSpec, path: &Path) -> Result<(), ChartError> {
    let format = ImageFormat::from_path(path).ok_or_else(|| ChartError::UnknownFormat {
        path: path.to_path_buf(),
    })?;
    let bytes = render_image(spec, format)?;
    std::fs::write(path, bytes).map_err(|source| ChartError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A run's live chart: a main "loss" panel (train loss solid, val loss with
/// markers) and below it "learning rate", "grad norm" and "throughput"
/// panels. Empty series are left out, and so is a panel left without series
/// (with no data at all the spec has no panels and rendering it returns
/// [`ChartError::EmptySpec`]).
#[allow(clippy::too_many_arguments)]
pub fn run_chart(
    run_name: &str,
    train_loss: Vec<(f64, f64)>,
    val_loss: Vec<(f64, f64)>,
    lr: Vec<(f64, f64)>,
    grad_norm: Vec<(f64, f64)>,
    tokens_per_s: Vec<(f64, f64)>,
    x_axis: XAxis,
    theme: Theme,
    width: u32,
    height: u32,
) -> ChartSpec {
    fn panel(title: &str, y_label: &str, series: Vec<Series>) -> Option<Panel> {
        let series: Vec<Series> = series
            .into_iter()
            .filter(|s| !s.points.is_empty())
            .collect();
        (!series.is_empty()).then(|| Panel {
            series,
            ..Panel::new(title, y_label)
        })
    }
    let panels = [
        panel(
            "loss",
            "loss",
            vec![
                Series::new("train loss", palette_color(0), train_loss),
                Series::new("val loss", palette_color(1), val_loss).with_style(LineStyle::Markers),
            ],
        ),
        panel(
            "learning rate",
            "lr",
            vec![Series::new("learning rate", palette_color(2), lr)],
        ),
        panel(
            "grad norm",
            "norm",
            vec![Series::new("grad norm", palette_color(3), grad_norm)],
        ),
        panel(
            "throughput",
            "tokens/s",
            vec![Series::new("throughput", palette_color(4), tokens_per_s)],
        ),
    ];
    ChartSpec {
        title: Some(run_name.to_string()),
        panels: panels.into_iter().flatten().collect(),
        x_axis,
        width,
        height,
        theme,
        ..ChartSpec::default()
    }
}

/// N runs of one metric overlaid in a single panel; each run's colour is
/// [`stable_color`]`(run id)` and its legend entry is the run name. Runs
/// without points are left out.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn compare_chart(
    metric_label: &str,
    runs: Vec<(i64, String, Vec<(f64, f64)>)>,
    x_axis: XAxis,
    smoothing: f64,
    log_y: bool,
    theme: Theme,
    width: u32,
    height: u32,
) -> ChartSpec {
    let series = runs
        .into_iter()
        .filter(|(_, _, points)| !points.is_empty())
        .map(|(id, name, points)| Series::new(name, stable_color(id), points))
        .collect();
    ChartSpec {
        title: None,
        panels: vec![Panel {
            series,
            log_y,
            ..Panel::new(metric_label, metric_label)
        }],
        x_axis,
        width,
        height,
        theme,
        smoothing,
        ..ChartSpec::default()
    }
}
