//! Series colours.

use super::Rgb;

/// Qualitative palette of 12 mid-luminance colours. Every colour has a
/// contrast ratio of at least 3:1 against both white and the dark theme
/// background `#1E1E1E` (WCAG contrast for graphical objects); the first ten
/// are the most distinct from each other.
pub const PALETTE: [Rgb; 12] = [
    Rgb(0x3b, 0x82, 0xf6), // blue
    Rgb(0xe8, 0x71, 0x0a), // orange
    Rgb(0x2e, 0x9e, 0x44), // green
    Rgb(0xe0, 0x41, 0x3a), // red
    Rgb(0x9b, 0x6b, 0xd6), // purple
    Rgb(0x14, 0xa3, 0xa3), // teal
    Rgb(0xd4, 0x5f, 0xa8), // pink
    Rgb(0x9c, 0x8e, 0x12), // olive
    Rgb(0xb5, 0x76, 0x3b), // brown
    Rgb(0x7c, 0x8a, 0xa0), // slate
    Rgb(0xc0, 0x40, 0xd0), // magenta
    Rgb(0x0f, 0x9e, 0xd8), // sky
];

/// The `index`-th palette colour, cycling after [`PALETTE`]`.len()`.
pub fn palette_color(index: usize) -> Rgb {
    PALETTE[index % PALETTE.len()]
}

/// The colour of a run: `palette_color(key mod 12)` (Euclidean modulo, so
/// negative ids work). It depends only on the id, so a run keeps its colour
/// in every chart and across restarts, and runs with consecutive ids (the
/// usual comparison) get different colours; ids 12 apart share one.
pub fn stable_color(key: i64) -> Rgb {
    palette_color(key.rem_euclid(PALETTE.len() as i64) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn luminance(c: Rgb) -> f64 {
        let lin = |v: u8| {
            let v = v as f64 / 255.0;
            if v <= 0.04045 {
                v / 12.92
            } else {
                ((v + 0.055) / 1.055).powf(2.4)
            }
        };
        0.2126 * lin(c.0) + 0.7152 * lin(c.1) + 0.0722 * lin(c.2)
    }

    fn contrast(a: Rgb, b: Rgb) -> f64 {
        let (la, lb) = (luminance(a), luminance(b));
        (la.max(lb) + 0.05) / (la.min(lb) + 0.05)
    }

    #[test]
    fn readable_on_both_themes() {
        for c in PALETTE {
            assert!(contrast(c, Rgb(255, 255, 255)) >= 3.0, "{c:?} on white");
            assert!(contrast(c, Rgb(0x1e, 0x1e, 0x1e)) >= 3.0, "{c:?} on dark");
        }
    }

    #[test]
    fn distinct_and_stable() {
        for (i, a) in PALETTE.iter().enumerate() {
            for b in &PALETTE[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(stable_color(-1), PALETTE[11]);
        assert_eq!(stable_color(13), PALETTE[1]);
    }
}
