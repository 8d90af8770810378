//! Marks series elements in the SVG output.
//!
//! plotters' SVG backend writes every path (grid lines, ticks, series) as an
//! anonymous `<polyline>`. To make series identifiable, each series element is
//! drawn with a unique *code opacity* (`0.5 + (k + 1) * 1e-7`, never used for
//! anything else). After rendering, [`Tagger::apply`] finds the `<polyline>`
//! and `<circle>` elements carrying a code, restores their real opacity and
//! adds `class`, `data-series`, `data-panel` (and `stroke-dasharray` for dashed
//! lines). The bitmap backend never sees codes: a disabled tagger hands back
//! the real opacity.

use std::collections::HashMap;

/// What a tagged element is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Role {
    /// The series line (smoothed if smoothing is on).
    Line,
    /// The faint raw line under a smoothed line.
    Raw,
    /// A point marker.
    Marker,
}

impl Role {
    fn class(self) -> &'static str {
        match self {
            Role::Line => "series",
            Role::Raw => "series-raw",
            Role::Marker => "series-marker",
        }
    }
}

struct Tag {
    role: Role,
    series: String,
    panel: usize,
    opacity: f64,
    dashed: bool,
}

/// Hands out draw opacities and rewrites the finished SVG.
pub(crate) struct Tagger {
    enabled: bool,
    tags: Vec<Tag>,
}

/// SVG dash pattern for `LineStyle::Dashed` (the bitmap backend uses the same
/// lengths).
pub(crate) const DASH: (u32, u32) = (8, 5);

impl Tagger {
    pub(crate) fn new(enabled: bool) -> Self {
        Tagger {
            enabled,
            tags: Vec::new(),
        }
    }

    /// The opacity to draw the element with: `opacity` itself when disabled,
    /// otherwise a fresh code that [`Tagger::apply`] turns back into `opacity`.
    pub(crate) fn alpha(
        &mut self,
        opacity: f64,
        role: Role,
        series: &str,
        panel: usize,
        dashed: bool,
    ) -> f64 {
        if !self.enabled {
            return opacity;
        }
        self.tags.push(Tag {
            role,
            series: series.to_string(),
            panel,
            opacity,
            dashed,
        });
        code_alpha(self.tags.len() - 1)
    }

    /// Whether dashes are applied as an SVG attribute (true) or must be drawn
    /// as separate segments (false).
    pub(crate) fn native_dash(&self) -> bool {
        self.enabled
    }

    /// Rewrites coded `<polyline>`/`<circle>` elements of `svg`.
    pub(crate) fn apply(&self, svg: &str) -> String {
        if self.tags.is_empty() {
            return svg.to_string();
        }
        let codes: HashMap<String, usize> = (0..self.tags.len())
            .map(|k| (format!("{}", code_alpha(k)), k))
            .collect();
        let mut out = String::with_capacity(svg.len() + self.tags.len() * 96);
        let mut rest = svg;
        while let Some(pos) = rest.find('<') {
            out.push_str(&rest[..pos]);
            rest = &rest[pos..];
            let name = ["<polyline ", "<circle "]
                .into_iter()
                .find(|n| rest.starts_with(n));
            let (Some(name), Some(end)) = (name, rest.find('>')) else {
                out.push('<');
                rest = &rest[1..];
                continue;
            };
            let element = &rest[..end];
            rest = &rest[end..];
            let coded = find_attr(element, "opacity")
                .and_then(|(range, value)| Some((range, codes.get(value)?)));
            let Some((range, &k)) = coded else {
                out.push_str(element);
                continue;
            };
            let tag = &self.tags[k];
            out.push_str(name);
            out.push_str(&format!(
                "class=\"{}\" data-series=\"{}\" data-panel=\"{}\" ",
                tag.role.class(),
                escape_attr(&tag.series),
                tag.panel
            ));
            if tag.role != Role::Marker {
                out.push_str("stroke-linejoin=\"round\" stroke-linecap=\"round\" ");
            }
            if tag.dashed {
                out.push_str(&format!("stroke-dasharray=\"{} {}\" ", DASH.0, DASH.1));
            }
            out.push_str(&element[name.len()..range.start]);
            out.push_str(&format!("{}", tag.opacity));
            out.push_str(&element[range.end..]);
        }
        out.push_str(rest);
        out
    }
}

fn code_alpha(k: usize) -> f64 {
    0.5 + (k as f64 + 1.0) * 1e-7
}

/// Byte range and value of attribute `name` inside an element's start tag.
fn find_attr<'a>(element: &'a str, name: &str) -> Option<(std::ops::Range<usize>, &'a str)> {
    let key = format!(" {name}=\"");
    let start = element.find(&key)? + key.len();
    let len = element[start..].find('"')?;
    Some((start..start + len, &element[start..start + len]))
}

fn escape_attr(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_only_coded_elements() {
        let mut t = Tagger::new(true);
        let a = t.alpha(1.0, Role::Line, "a<b", 2, true);
        let svg = format!(
            "<svg>\n<polyline fill=\"none\" opacity=\"0.12\" points=\"\"/>\n<polyline fill=\"none\" opacity=\"{a}\" stroke=\"#000000\"/>\n</svg>"
        );
        let out = t.apply(&svg);
        assert!(out.contains("<polyline fill=\"none\" opacity=\"0.12\" points=\"\"/>"));
        assert!(out.contains(
            "<polyline class=\"series\" data-series=\"a&lt;b\" data-panel=\"2\" stroke-linejoin=\"round\" stroke-linecap=\"round\" stroke-dasharray=\"8 5\" fill=\"none\" opacity=\"1\" stroke=\"#000000\"/>"
        ));
    }

    #[test]
    fn disabled_returns_real_opacity() {
        let mut t = Tagger::new(false);
        assert_eq!(t.alpha(0.25, Role::Raw, "x", 0, false), 0.25);
    }
}
