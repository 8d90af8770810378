//! A tiny tokenizer for tests and examples, so data code can be exercised without a model.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// The special tokens [`tiny_tokenizer`] knows, in id order after the 256 byte tokens.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"];

/// A GPT-2-style byte-level BPE: one token per byte (ids 0..256, in the byte-level
/// alphabet's sorted order), a few merges (`Ġt`+`h`… enough to make multi-byte tokens), and
/// [`SPECIAL_TOKENS`] as added special tokens. Encodes any text losslessly.
pub fn tiny_tokenizer() -> Tokenizer {
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let mut vocab: Vocab = alphabet.iter().enumerate().map(|(i, c)| (c.to_string(), i as u32)).collect();
    let merges: Vec<(String, String)> =
        [("Ġ", "t"), ("Ġt", "h"), ("Ġth", "e"), ("e", "r"), ("i", "n"), ("Ġ", "a"), ("l", "l")]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
    for (a, b) in &merges {
        let next = vocab.len() as u32;
        vocab.entry(format!("{a}{b}")).or_insert(next);
    }
    let bpe = match BPE::builder().vocab_and_merges(vocab, merges).build() {
        Ok(b) => b,
        // The vocabulary above holds every merge's parts; this cannot fail.
        Err(e) => unreachable!("tiny tokenizer: {e}"),
    };
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    let special: Vec<AddedToken> = SPECIAL_TOKENS.iter().map(|s| AddedToken::from(*s, true)).collect();
    tok.add_special_tokens(&special);
    tok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_keeps_special_tokens_whole() {
        let tok = tiny_tokenizer();
        let text = "<|im_start|>user\nsay the café, 1 + 1<|im_end|>\n";
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        assert_eq!(enc.get_ids()[0], tok.token_to_id("<|im_start|>").unwrap());
        assert_eq!(tok.token_to_id("<|endoftext|>"), Some(256 + 7 + 2));
        assert!(enc.get_tokens().iter().any(|t| t == "Ġthe"), "{:?}", enc.get_tokens());
    }
}
