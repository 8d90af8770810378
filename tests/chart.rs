//! Tests of the chart module through its public API only.

use tunebench::chart::*;
use std::path::PathBuf;

// ---------------------------------------------------------------- helpers

fn line(n: usize, f: impl Fn(f64) -> f64) -> Vec<(f64, f64)> {
    (0..n).map(|i| (i as f64, f(i as f64))).collect()
}

/// Deterministic pseudo-noise in [-0.5, 0.5).
fn noise(i: f64) -> f64 {
    ((i * 12.9898).sin() * 43758.5453).fract() - 0.5
}

fn loss_curve(n: usize) -> Vec<(f64, f64)> {
    line(n, |i| 2.5 * (-i / 300.0).exp() + 0.6 + 0.1 * noise(i))
}

fn parse(svg: &str) -> roxmltree::Document<'_> {
    roxmltree::Document::parse(svg).expect("SVG must be well-formed XML")
}

/// `<polyline>` elements with the given class.
fn polylines<'a>(doc: &'a roxmltree::Document<'a>, class: &str) -> Vec<roxmltree::Node<'a, 'a>> {
    doc.descendants()
        .filter(|n| n.has_tag_name("polyline") && n.attribute("class") == Some(class))
        .collect()
}

/// Trimmed contents of all `<text>` elements.
fn texts(doc: &roxmltree::Document<'_>) -> Vec<String> {
    doc.descendants()
        .filter(|n| n.has_tag_name("text"))
        .map(|n| n.text().unwrap_or("").trim().to_string())
        .collect()
}

fn point_count(polyline: &roxmltree::Node<'_, '_>) -> usize {
    polyline
        .attribute("points")
        .unwrap_or("")
        .split_whitespace()
        .count()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("chart-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// (width, height) from a PNG's IHDR chunk, after checking the signature.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR", "first chunk must be IHDR");
    let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

/// Fully decodes a PNG (validates zlib stream and checksums) into RGB8.
fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(bytes);
    let mut reader = decoder.read_info().expect("PNG header");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("PNG data");
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

fn full_run_chart(theme: Theme) -> ChartSpec {
    let n = 1500;
    run_chart(
        "run-7",
        loss_curve(n),
        loss_curve(n)
            .into_iter()
            .step_by(100)
            .map(|(x, y)| (x, y + 0.1))
            .collect(),
        line(n, |i| 3e-4 * (1.0 - i / n as f64)),
        line(n, |i| 1.0 + 0.3 * noise(i * 3.0)),
        line(n, |i| 12_000.0 + 500.0 * noise(i * 7.0)),
        XAxis::Step,
        theme,
        1000,
        800,
    )
}

// ------------------------------------------------------------------- lttb

#[test]
fn lttb_keeps_first_last_and_hits_threshold() {
    let pts = loss_curve(10_000);
    for threshold in [3, 10, 500, 2000, 9_999] {
        let out = lttb(&pts, threshold);
        assert_eq!(out.len(), threshold);
        assert_eq!(out.first(), pts.first());
        assert_eq!(out.last(), pts.last());
        assert!(
            out.windows(2).all(|w| w[0].0 < w[1].0),
            "output stays sorted by x"
        );
    }
}

#[test]
fn lttb_keeps_a_single_spike() {
    let mut pts = line(10_000, |_| 1.0);
    pts[5_123].1 = 50.0;
    let out = lttb(&pts, 100);
    assert_eq!(out.len(), 100);
    assert!(
        out.contains(&(5_123.0, 50.0)),
        "the outlier must survive downsampling"
    );
    // Also a negative spike.
    pts[5_123].1 = 1.0;
    pts[777].1 = -40.0;
    assert!(lttb(&pts, 50).contains(&(777.0, -40.0)));
}

#[test]
fn lttb_on_a_million_points() {
    let pts = line(1_000_000, |i| (i * 1e-3).sin() + 0.01 * noise(i));
    let out = lttb(&pts, 2000);
    assert_eq!(out.len(), 2000);
    assert_eq!(out[0], pts[0]);
    assert_eq!(out[1999], pts[999_999]);
}

#[test]
fn lttb_returns_short_input_unchanged() {
    let pts = loss_curve(50);
    assert_eq!(lttb(&pts, 50), pts);
    assert_eq!(lttb(&pts, 2000), pts);
    assert_eq!(lttb(&pts, 0), pts, "threshold 0 means no downsampling");
    assert_eq!(lttb(&[], 10), Vec::<(f64, f64)>::new());
    assert_eq!(lttb(&pts, 2), vec![pts[0], pts[49]]);
    assert_eq!(lttb(&pts, 1), vec![pts[0]]);
}

// -------------------------------------------------------------------- ema

#[test]
fn ema_weight_zero_is_identity() {
    let pts = loss_curve(300);
    assert_eq!(ema(&pts, 0.0), pts);
}

#[test]
fn ema_keeps_constant_series_constant() {
    let pts = line(500, |_| 0.731);
    for w in [0.3, 0.6, 0.9, 0.99] {
        let out = ema(&pts, w);
        assert_eq!(out.len(), pts.len());
        assert!(
            out.iter().all(|p| (p.1 - 0.731).abs() < 1e-12),
            "weight {w}"
        );
    }
}

#[test]
fn ema_is_debiased() {
    let pts = loss_curve(400);
    for w in [0.5, 0.9, 0.999] {
        let out = ema(&pts, w);
        assert_eq!(
            out[0], pts[0],
            "first smoothed value equals the first raw value"
        );
        assert!(
            out.iter().zip(&pts).all(|(a, b)| a.0 == b.0),
            "x is unchanged"
        );
    }
    // A step from 1 to 3: smoothed values lie between the extremes and lag.
    let step: Vec<(f64, f64)> = line(100, |i| if i < 50.0 { 1.0 } else { 3.0 });
    let out = ema(&step, 0.9);
    assert!(out.iter().all(|p| p.1 > 1.0 - 1e-9 && p.1 < 3.0 + 1e-9));
    assert!(out[50].1 < 1.5 && out[99].1 > 2.9);
    // Non-finite values pass through without disturbing the average.
    let mut holes = line(10, |_| 2.0);
    holes[1].1 = 5.0;
    holes[4].1 = f64::NAN;
    let out = ema(&holes, 0.5);
    assert!(out[4].1.is_nan());
    assert!(out[5].1.is_finite());
}

// -------------------------------------------------------------- run chart

#[test]
fn run_chart_svg_has_one_line_per_series_and_labels() {
    let spec = full_run_chart(Theme::Light);
    assert_eq!(spec.panels.len(), 4);
    let svg = render_svg(&spec).unwrap();
    let doc = parse(&svg);
    assert_eq!(doc.root_element().attribute("width"), Some("1000"));
    assert_eq!(doc.root_element().attribute("height"), Some("800"));

    let lines = polylines(&doc, "series");
    let non_empty: usize = spec
        .panels
        .iter()
        .map(|p| p.series.iter().filter(|s| !s.points.is_empty()).count())
        .sum();
    assert_eq!(non_empty, 5);
    assert_eq!(lines.len(), non_empty);
    let mut panels: Vec<&str> = lines
        .iter()
        .map(|l| l.attribute("data-panel").unwrap())
        .collect();
    panels.dedup();
    assert_eq!(panels, ["0", "1", "2", "3"]);
    assert!(
        polylines(&doc, "series-raw").is_empty(),
        "no raw lines without smoothing"
    );

    // Train and val loss: two distinct colours; val loss has markers.
    let stroke = |name: &str| {
        lines
            .iter()
            .find(|l| l.attribute("data-series") == Some(name))
            .unwrap()
            .attribute("stroke")
            .unwrap()
    };
    assert_ne!(stroke("train loss"), stroke("val loss"));
    let markers = doc
        .descendants()
        .filter(|n| n.has_tag_name("circle") && n.attribute("class") == Some("series-marker"))
        .filter(|n| n.attribute("data-series") == Some("val loss"))
        .count();
    assert_eq!(markers, 15);

    let texts = texts(&doc);
    for expected in [
        "run-7",
        "step",
        "loss",
        "learning rate",
        "lr",
        "grad norm",
        "norm",
        "throughput",
        "tokens/s",
        "train loss",
        "val loss",
    ] {
        assert!(
            texts.iter().any(|t| t == expected),
            "missing text {expected:?} in {texts:?}"
        );
    }
    // The x axis description appears once (bottom panel).
    assert_eq!(texts.iter().filter(|t| *t == "step").count(), 1);
}

#[test]
fn run_chart_skips_empty_series_and_panels() {
    let spec = run_chart(
        "partial",
        loss_curve(200),
        Vec::new(),
        line(200, |_| 1e-4),
        Vec::new(),
        Vec::new(),
        XAxis::Tokens,
        Theme::Light,
        800,
        600,
    );
    assert_eq!(spec.panels.len(), 2);
    assert_eq!(spec.panels[0].series.len(), 1);
    let svg = render_svg(&spec).unwrap();
    let doc = parse(&svg);
    assert_eq!(polylines(&doc, "series").len(), 2);
    let texts = texts(&doc);
    assert!(texts.iter().any(|t| t == "tokens"));
    assert!(!texts.iter().any(|t| t == "grad norm" || t == "val loss"));

    // No data at all: no panels, and rendering says so.
    let empty = run_chart(
        "empty",
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        XAxis::Step,
        Theme::Dark,
        800,
        600,
    );
    assert!(empty.panels.is_empty());
    assert!(matches!(render_svg(&empty), Err(ChartError::EmptySpec)));
}

#[test]
fn dark_theme_uses_dark_background() {
    let svg = render_svg(&full_run_chart(Theme::Dark)).unwrap();
    let doc = parse(&svg);
    let bg = doc.descendants().find(|n| n.has_tag_name("rect")).unwrap();
    assert_eq!(bg.attribute("width"), Some("1000"));
    assert_eq!(
        bg.attribute("fill").map(str::to_ascii_lowercase),
        Some(Theme::Dark.background().to_hex())
    );
    assert_eq!(Theme::Dark.background(), Rgb(0x1e, 0x1e, 0x1e));
    // Text is light on dark.
    let text = doc.descendants().find(|n| n.has_tag_name("text")).unwrap();
    let fill = Rgb::from_hex(text.attribute("fill").unwrap()).unwrap();
    assert!(fill.0 > 0xa0 && fill.1 > 0xa0 && fill.2 > 0xa0, "{fill:?}");

    let light = render_svg(&full_run_chart(Theme::Light)).unwrap();
    let doc = parse(&light);
    let bg = doc.descendants().find(|n| n.has_tag_name("rect")).unwrap();
    assert_eq!(
        bg.attribute("fill").map(str::to_ascii_lowercase).as_deref(),
        Some("#ffffff")
    );
}

// ---------------------------------------------------------- compare chart

/// (run id, run name, points), as `compare_chart` takes them.
type Runs = Vec<(i64, String, Vec<(f64, f64)>)>;

fn three_runs() -> Runs {
    vec![
        (3, "baseline".to_string(), loss_curve(800)),
        (
            17,
            "lr=2e-4".to_string(),
            line(800, |i| 2.0 * (-i / 200.0).exp() + 0.5),
        ),
        (
            42,
            "rank 64 & <alpha>".to_string(),
            line(400, |i| 1.5 + 0.2 * noise(i)),
        ),
    ]
}

#[test]
fn compare_chart_colours_and_legend() {
    let runs = three_runs();
    let spec = compare_chart(
        "train loss",
        runs.clone(),
        XAxis::Step,
        0.0,
        false,
        Theme::Light,
        900,
        500,
    );
    let svg = render_svg(&spec).unwrap();
    let doc = parse(&svg);
    let lines = polylines(&doc, "series");
    assert_eq!(lines.len(), 3);
    let texts = texts(&doc);
    for (id, name, _) in &runs {
        assert!(
            texts.iter().any(|t| t == name),
            "legend entry {name:?} missing"
        );
        let line = lines
            .iter()
            .find(|l| l.attribute("data-series") == Some(name.as_str()))
            .unwrap();
        assert_eq!(
            line.attribute("stroke").unwrap().to_ascii_lowercase(),
            stable_color(*id).to_hex()
        );
    }
    assert!(texts.iter().any(|t| t == "train loss"));
}

#[test]
fn compare_chart_smoothing_and_log_survive_bad_data() {
    let mut runs = three_runs();
    runs[0].2[10].1 = 0.0;
    runs[0].2[11].1 = f64::NAN;
    runs[1].2[0].1 = -1.0;
    runs[1].2[5] = (f64::INFINITY, 1.0);
    runs[2].2[7].1 = f64::NEG_INFINITY;
    runs.push((99, "all zeros".to_string(), line(30, |_| 0.0)));
    for (smoothing, log_y) in [(0.0, true), (0.9, false), (0.9, true), (0.6, true)] {
        let spec = compare_chart(
            "eval loss",
            runs.clone(),
            XAxis::WallTime,
            smoothing,
            log_y,
            Theme::Dark,
            700,
            400,
        );
        let svg = render_svg(&spec).unwrap();
        let doc = parse(&svg);
        // On a log axis the all-zero run has nothing left to draw.
        let expected = if log_y { 3 } else { 4 };
        assert_eq!(
            polylines(&doc, "series").len(),
            expected,
            "smoothing {smoothing} log {log_y}"
        );
        let raw = if smoothing > 0.0 { expected } else { 0 };
        assert_eq!(polylines(&doc, "series-raw").len(), raw);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        assert!(texts(&doc).iter().any(|t| t == "wall time (s)"));
        render_png(&spec).unwrap();
    }
}

// --------------------------------------------------- downsampling in render

#[test]
fn million_point_series_is_downsampled() {
    let big = line(1_000_000, |i| 2.0 * (-i / 2e5).exp() + 0.5 + 0.1 * noise(i));
    // Timing is printed, not asserted: `cargo test --release million -- --nocapture`.
    let start = std::time::Instant::now();
    let spec = run_chart(
        "big",
        big,
        vec![],
        vec![],
        vec![],
        vec![],
        XAxis::Step,
        Theme::Light,
        1000,
        600,
    );
    let svg = render_svg(&spec).unwrap();
    let svg_time = start.elapsed();
    let start = std::time::Instant::now();
    let png = render_png(&spec).unwrap();
    println!(
        "1M points: run_chart + render_svg {svg_time:?}, render_png {:?}",
        start.elapsed()
    );
    let doc = parse(&svg);
    let lines = polylines(&doc, "series");
    assert_eq!(lines.len(), 1);
    assert_eq!(point_count(&lines[0]), DEFAULT_MAX_POINTS);
    assert_eq!(png_size(&png), (1000, 600));

    let mut smaller = spec.clone();
    smaller.max_points = 100;
    smaller.smoothing = 0.8;
    let svg = render_svg(&smaller).unwrap();
    let doc = parse(&svg);
    assert_eq!(point_count(&polylines(&doc, "series")[0]), 100);
    assert_eq!(point_count(&polylines(&doc, "series-raw")[0]), 100);
}

#[test]
fn degenerate_series_still_draw() {
    let mut panel = Panel::new("odd data", "value");
    panel
        .series
        .push(Series::new("single", palette_color(0), vec![(5.0, 2.0)]));
    panel
        .series
        .push(Series::new("flat", palette_color(1), line(20, |_| 0.0)));
    panel.series.push(
        Series::new("dashed", palette_color(2), line(20, |i| i)).with_style(LineStyle::Dashed),
    );
    panel.series.push(Series::new(
        "nothing finite",
        palette_color(3),
        vec![(f64::NAN, 1.0), (1.0, f64::INFINITY)],
    ));
    let mut empty_panel = Panel::new("empty", "none");
    empty_panel.log_y = true;
    let spec = ChartSpec {
        panels: vec![panel, empty_panel],
        width: 640,
        height: 480,
        ..ChartSpec::default()
    };
    let svg = render_svg(&spec).unwrap();
    let doc = parse(&svg);
    let lines = polylines(&doc, "series");
    assert_eq!(lines.len(), 3);
    let single = doc
        .descendants()
        .filter(|n| n.has_tag_name("circle") && n.attribute("data-series") == Some("single"))
        .count();
    assert_eq!(single, 1, "a single point gets a marker");
    let dashed = lines
        .iter()
        .find(|l| l.attribute("data-series") == Some("dashed"))
        .unwrap();
    assert!(dashed.attribute("stroke-dasharray").is_some());
    assert!(texts(&doc).iter().any(|t| t == "no data"));
    // Single point alone in a chart (degenerate x and y range).
    let mut one = Panel::new("one", "y");
    one.series
        .push(Series::new("p", palette_color(4), vec![(0.0, 0.0)]));
    let spec = ChartSpec {
        panels: vec![one],
        width: 300,
        height: 200,
        ..ChartSpec::default()
    };
    parse(&render_svg(&spec).unwrap());
    assert_eq!(png_size(&render_png(&spec).unwrap()), (300, 200));
}

// -------------------------------------------------------------------- PNG

#[test]
fn png_has_requested_size() {
    for (w, h) in [(800, 600), (1234, 321)] {
        let mut spec = full_run_chart(Theme::Light);
        spec.width = w;
        spec.height = h;
        let bytes = render_png(&spec).unwrap();
        assert_eq!(png_size(&bytes), (w, h));
        let (dw, dh, pixels) = decode_png(&bytes);
        assert_eq!((dw, dh), (w, h));
        assert_eq!(pixels.len(), (w * h * 3) as usize);
        assert_eq!(&pixels[..3], &[255, 255, 255], "light background");
        assert_eq!(
            render_rgb(&spec).unwrap(),
            pixels,
            "PNG holds exactly the rendered pixels"
        );
    }
    let dark = render_png(&full_run_chart(Theme::Dark)).unwrap();
    let (_, _, pixels) = decode_png(&dark);
    assert_eq!(&pixels[..3], &[0x1e, 0x1e, 0x1e], "dark background");
    // Series colours and text are really drawn (not just background).
    let blue = palette_color(0);
    assert!(pixels.chunks(3).any(|p| p == [blue.0, blue.1, blue.2]));
}

#[test]
fn render_to_file_by_extension() {
    let dir = temp_dir("files");
    let spec = full_run_chart(Theme::Light);

    let png_path = dir.join("chart.png");
    render_to_file(&spec, &png_path).unwrap();
    assert_eq!(png_size(&std::fs::read(&png_path).unwrap()), (1000, 800));

    let upper = dir.join("CHART.PNG");
    render_to_file(&spec, &upper).unwrap();
    assert_eq!(png_size(&std::fs::read(&upper).unwrap()), (1000, 800));

    let svg_path = dir.join("chart.svg");
    render_to_file(&spec, &svg_path).unwrap();
    let text = std::fs::read_to_string(&svg_path).unwrap();
    assert_eq!(polylines(&parse(&text), "series").len(), 5);

    let bad = dir.join("chart.jpg");
    let err = render_to_file(&spec, &bad).unwrap_err();
    assert!(matches!(err, ChartError::UnknownFormat { .. }));
    assert!(
        err.to_string().contains(&bad.display().to_string()),
        "{err}"
    );
    assert!(!bad.exists());

    let missing_dir = dir.join("no-such-dir").join("chart.svg");
    let err = render_to_file(&spec, &missing_dir).unwrap_err();
    assert!(matches!(err, ChartError::Io { .. }));
    assert!(
        err.to_string().contains(&missing_dir.display().to_string()),
        "{err}"
    );

    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn image_format_from_path() {
    use std::path::Path;
    assert_eq!(
        ImageFormat::from_path(Path::new("a/b.svg")),
        Some(ImageFormat::Svg)
    );
    assert_eq!(
        ImageFormat::from_path(Path::new("b.Png")),
        Some(ImageFormat::Png)
    );
    assert_eq!(ImageFormat::from_path(Path::new("b.jpeg")), None);
    assert_eq!(ImageFormat::from_path(Path::new("svg")), None);
}

// ----------------------------------------------------------------- errors

#[test]
fn empty_spec_is_an_error() {
    let spec = ChartSpec::default();
    assert!(matches!(render_svg(&spec), Err(ChartError::EmptySpec)));
    assert!(matches!(render_png(&spec), Err(ChartError::EmptySpec)));
    assert!(render_svg(&spec)
        .unwrap_err()
        .to_string()
        .contains("no panels"));
}

#[test]
fn bad_sizes_are_errors() {
    for (w, h) in [(0, 600), (800, 0), (0, 0), (8193, 100), (100, 100_000)] {
        let mut spec = full_run_chart(Theme::Light);
        spec.width = w;
        spec.height = h;
        let err = render_png(&spec).unwrap_err();
        assert!(matches!(err, ChartError::BadSize { width, height } if width == w && height == h));
        assert!(err.to_string().contains(&format!("{w}x{h}")), "{err}");
        assert!(matches!(render_svg(&spec), Err(ChartError::BadSize { .. })));
    }
}

#[test]
fn tiny_and_extreme_sizes_render() {
    let sizes = [
        (1, 1),
        (2, 3),
        (10, 10),
        (50, 30),
        (80, 60),
        (120, 90),
        (200, 100),
        (300, 150),
        (4000, 64),
        (64, 2000),
    ];
    for (w, h) in sizes {
        let mut spec = full_run_chart(Theme::Light);
        spec.width = w;
        spec.height = h;
        let png = render_png(&spec).unwrap_or_else(|e| panic!("{w}x{h}: {e}"));
        assert_eq!(png_size(&png), (w, h));
        let svg = render_svg(&spec).unwrap_or_else(|e| panic!("{w}x{h}: {e}"));
        parse(&svg);
    }
}

// ---------------------------------------------------------- colours, serde

#[test]
fn palette_and_stable_colours() {
    let colours: std::collections::HashSet<Rgb> = (0..10).map(palette_color).collect();
    assert_eq!(colours.len(), 10);
    assert_eq!(stable_color(12345), stable_color(12345));
    assert_ne!(stable_color(1), stable_color(2));
    assert_eq!(stable_color(-7), stable_color(-7));
    assert_eq!(
        Rgb::from_hex(&Rgb(1, 171, 255).to_hex()),
        Some(Rgb(1, 171, 255))
    );
}

#[test]
fn spec_round_trips_through_json() {
    let mut spec = run_chart(
        "json",
        vec![(0.0, 2.5), (1.0, 2.25), (2.0, f64::MAX)],
        vec![(2.0, 2.125)],
        vec![(0.0, 1e-4)],
        vec![],
        vec![(1.0, 9000.0)],
        XAxis::Tokens,
        Theme::Dark,
        640,
        480,
    );
    spec.smoothing = 0.5;
    spec.panels[0].series[1].style = LineStyle::Dashed;
    spec.panels[1].log_y = true;
    let json = serde_json::to_string(&spec).unwrap();
    let back: ChartSpec = serde_json::from_str(&json).unwrap();
    assert_eq!(back, spec);
    // Missing fields take their defaults.
    let minimal: ChartSpec =
        serde_json::from_str(r#"{"panels":[{"title":"t","y_label":"y","series":[]}]}"#).unwrap();
    assert_eq!(minimal.max_points, DEFAULT_MAX_POINTS);
    assert_eq!(minimal.theme, Theme::Light);
    assert!(!minimal.panels[0].log_y);
}

#[test]
fn extreme_values_render() {
    let cases: Vec<Vec<(f64, f64)>> = vec![
        vec![(0.0, 1e300), (1.0, -1e300)],
        vec![(0.0, f64::MAX), (1.0, -f64::MAX), (2.0, 0.0)],
        vec![(-f64::MAX, 1.0), (f64::MAX, 2.0)],
        vec![(0.0, 1.0), (1.0, 1.0 + 1e-15), (2.0, 1.0)],
        vec![(5.0, 1.0), (5.0, 2.0), (5.0, 3.0)],
        vec![(3.0, 1.0), (1.0, 2.0), (2.0, 0.5), (-7.0, 4.0)],
        vec![(0.0, 1e-300), (1.0, 2e-300)],
        vec![(1e15, 1.0), (1e15 + 1.0, 2.0)],
        vec![(0.0, f64::MIN_POSITIVE), (1.0, 1e308)],
    ];
    for (i, points) in cases.into_iter().enumerate() {
        for log_y in [false, true] {
            for smoothing in [0.0, 0.9] {
                let spec = compare_chart(
                    "m",
                    vec![(1, "r".into(), points.clone())],
                    XAxis::Tokens,
                    smoothing,
                    log_y,
                    Theme::Light,
                    400,
                    300,
                );
                let svg = render_svg(&spec).unwrap_or_else(|e| panic!("case {i} log {log_y}: {e}"));
                parse(&svg);
                render_png(&spec).unwrap_or_else(|e| panic!("case {i} log {log_y}: {e}"));
            }
        }
    }
}
