#!/usr/bin/env python3
"""Writes tests/fixtures/tokenizer/clip.json: Hugging Face's CLIP token ids for many prompts.

sdrs' tokenizer (src/tokenizer.rs) must give exactly these ids. The oracle is
transformers' Python ("slow") `CLIPTokenizer` from transformers 4.x, loaded from
shared/data/clip/hf (openai/clip-vit-large-patch14), which is what diffusers' SD
pipelines and most SD front ends have used.

Produced with: CPython 3.13.0 (unicodedata 15.1.0), transformers 4.57.6,
tokenizers 0.22.2, regex 2026.11.19, ftfy NOT installed; 94 prompts.
Reproduce:
    python3.13 -m venv /tmp/v && /tmp/v/bin/pip install "transformers==4.57.6"
    /tmp/v/bin/python tools/tokenizer_fixture.py [/path/to/shared/data/clip/hf]
(no torch needed). The script refuses to run with ftfy importable, see below.

What the fixture holds per prompt:
  ids         - `tokenizer(prompt, add_special_tokens=False).input_ids`
  padded_eos  - `tokenizer(prompt, padding="max_length", max_length=77, truncation=True)`:
                BOS, at most 75 tokens, EOS, padded with <|endoftext|> (49407): SD 1.x.
  padded_zero - the same with the padding positions set to 0 (`!`), as SD 2.x and
                SDXL's OpenCLIP encoder (open_clip's tokenizer) pad. Built by padding the
                truncated ids with 0 here, NOT by loading the tokenizer with
                pad_token="!" (diffusers' SD 2.x tokenizer config): that makes `!` a
                special token, so "wow!" becomes [2781, 0] instead of [2781, 256]; the
                original open_clip tokenizer does not do that.
  fast_ids    - `CLIPTokenizerFast` (converted from the same files) without BOS/EOS, for
                information, not tested: it differs from the slow tokenizer on 19 of the
                94 prompts (control and format characters such as ZWJ and soft hyphen,
                unassigned and private-use code points, CJK spacing, Greek final sigma,
                U+0345, specials glued to punctuation). transformers 5.x's `CLIPTokenizer`
                is such a tokenizers-library pipeline too (no Python BPE any more): 5.24.0
                differs from `ids` on the same 19 prompts and from `fast_ids` on 2
                (upper-case `<|ENDOFTEXT|>`).

Why no ftfy: the slow CLIPTokenizer uses `ftfy.fix_text` + whitespace collapse +
lower() when ftfy is importable, and otherwise BERT's BasicTokenizer cleanup (drop
NUL/U+FFFD/category C* except \\t\\n\\r, Zs and \\t\\n\\r -> space, spaces around CJK
ideographs, NFC, split on whitespace, lower(); no accent stripping, no punctuation
split). sdrs reproduces the latter. With ftfy 6.3.1 installed, 20 of these 94
prompts tokenize differently: ftfy keeps ZWSP/ZWNJ/ZWJ, soft hyphen, U+FFFD and
unassigned and private-use code points, removes terminal escapes (`\x1b[0m`) whole,
turns U+0085 into an ellipsis, does not space CJK ideographs, straightens curly quotes
(so "don’t" gets the `'t` contraction), unescapes HTML entities (&amp; -> &), and
folds fullwidth forms and ligatures (ﬁ -> fi, ǅ -> dž).
Printable ASCII prompts without HTML entities tokenize the same either way.

Code points assigned after Unicode 15.1 are kept out of the prompts: Python's
unicodedata (15.1 here) calls them unassigned (category Cn, dropped), while sdrs'
tables are newer.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_HF = os.path.join(HERE, "..", "..", "shared", "data", "clip", "hf")
OUT = os.path.join(HERE, "..", "tests", "fixtures", "tokenizer", "clip.json")
MAX_LEN = 77

LONG = (
    "masterpiece, best quality, ultra detailed, 8k wallpaper, a breathtaking panoramic view of an ancient "
    "city built into the side of a mountain, waterfalls cascading between stone towers, golden hour light, "
    "volumetric fog, intricate carvings, lush vegetation, birds flying over the valley, highly detailed, "
    "sharp focus, cinematic composition, trending on artstation, by greg rutkowski and alphonse mucha, "
    "octane render, unreal engine 5, ray tracing, depth of field, bokeh, 35mm lens, f/1.8"
)

PROMPTS = [
    "",
    "a photo of a cat",
    "A Photo Of A CAT",
    "a painting of a fox sitting in a field at sunrise in the style of Claude Monet",
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer",
    "1024x768 wallpaper, 3.14 pi, 100% detail, 4k, 8K UHD",
    "version 2.0.1-beta_rc3 build#42",
    "numbers 123456789 0.5 -3 1e-5 0x1F 007",
    "don't can't won't I'm you're we've they'll she'd it's",
    "DON'T IT'S WE'LL",
    "rock'n'roll, o'clock, 'quoted' words, ''s 'd",
    "\u2018curly\u2019 \u201cquotes\u201d don\u2019t",
    "l'\u00e9t\u00e9 d'accord aujourd'hui",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 fa\u00e7ade",
    "cafe\u0301 nai\u0308ve (decomposed accents)",
    "\u00c5ngstr\u00f6m \u00c6r\u00f8sk\u00f8bing Stra\u00dfe \u1e9e",
    "\u039f\u0394\u039f\u03a3 \u03a3\u03af\u03c3\u03c5\u03c6\u03bf\u03c2 \u03a3\u0391\u03a3.",
    "\u0130stanbul I\u011eDIR \u0130\u0307",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u041c\u041e\u0421\u041a\u0412\u0410",
    "abc\u0430\u0431\u0432\u03b1\u03b2\u03b3 mixed scripts",
    "\u6771\u4eac\u30bf\u30ef\u30fc \u591c\u666f",
    "\u4e2d\u6587\u63d0\u793a\u8bcd\uff1a\u4e00\u53ea\u732b\u5750\u5728\u7a97\u53f0\u4e0a",
    "\u65e5\u672c\u8a9e\u306e\u30d7\u30ed\u30f3\u30d7\u30c8\u3001\u685c\u306e\u6728",
    "\ud55c\uad6d\uc5b4 \ud504\ub86c\ud504\ud2b8",
    "\u1100\u1161\u11a8 decomposed hangul",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
    "\u05e9\u05b8\u05c1\u05dc\u05d5\u05b9\u05dd",
    "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35",
    "CJK ext B \U00020000\U00020001, compatibility \uf900, ext E \U0002b820",
    "emoji \U0001f600\U0001f389\U0001f525 party",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 family",
    "\U0001f3f3\ufe0f\u200d\U0001f308 flag \u2764\ufe0f heart \U0001f44d\U0001f3fd thumbs",
    "\U0001f469\U0001f3fd\u200d\U0001f4bb and \U0001f9d1\u200d\U0001f680",
    "\U0001f970\U0001fae0 newer emoji",
    "tabs\tand\nnewlines\r\nand   multiple    spaces",
    "   leading and trailing   ",
    "   \t\n  ",
    "\u00a0nbsp\u2003em space\u3000ideographic space",
    "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom",
    "soft\u00adhyphen",
    "control\x00chars\x07here\x1b[0m",
    "replacement \ufffd char",
    "line\u2028separator\u2029paragraph\x85next\x0bvt\x0cff\x1cfs",
    "unassigned a\u0378b and private use \ue000",
    "!!!???...,,,;;;",
    "...,;:!?-_=+*/\\|~`^",
    "(((masterpiece))), [[[bad hands]]], {{{best}}}",
    "(word:1.2), (cat:0.8) [dog:cat:0.5] <lora:myLora_v2:0.7>",
    "embedding:easynegative, BREAK, a AND b",
    "a<|endoftext|>b",
    "<|startoftext|>hello<|endoftext|>",
    "text <|endoftext|> more text",
    "!!<|endoftext|>",
    "!!<|ENDOFTEXT|>",
    "<|ENDOFTEXT|> shout",
    "<|endo\x00ftext|>",
    "<|endoftext",
    "<|startoftext|><|endoftext|>",
    "long s \u017f '\u017f <|\u017ftartoftext|> x",
    "ypogegrammeni a\u0345 \u0345 \u1fb3",
    "&amp; &lt;tag&gt; &quot;quoted&quot; &#39;x&#39; &nbsp;",
    "<b>bold</b> <i>html</i>",
    "https://example.com/path?q=1&x=2 user@example.com",
    "C:\\Users\\name\\file.png",
    "#hashtag @mention $100 \u20ac50 \u00a330 \u00a51000",
    "x\u00b2 + y\u00b3 = z\u00bd \u2460\u2461\u2462 \u216b",
    "\u0661\u0662\u0663 \u0966\u0967\u0968 \u0e51\u0e52\u0e53",
    "\ufb01ne \ufb02ower \ufb00 \ufb06",
    "\uff26\uff35\uff2c\uff2c\uff37\uff29\uff24\uff34\uff28 \uff54\uff45\uff58\uff54 \uff11\uff12\uff13",
    "\U0001d544\U0001d552\U0001d565\U0001d559 \U0001d4c8\U0001d4b8\U0001d4c7\U0001d4be\U0001d4c5\U0001d4c9",
    "\u24b6\u24d1\u24d2 circled",
    "\u01c5ungla \u01c8 \u01c4",
    "ab\u0301\u0302c e\u0301",
    "snake_case camelCase kebab-case PascalCase",
    "supercalifragilisticexpialidocious",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "photorealistic, hyperrealistic, unrealisticness",
    "a " * 74 + "a",
    "a " * 75 + "a",
    "a " * 76 + "a",
    LONG,
    LONG + ", " + LONG,
    "Hello, World! How's it going? I'm fine.",
    "A cat's toy; the dogs' bone.",
    "a\u00a0b",
    "x" * 300,
    "\u3000\u5168\u89d2\u30b9\u30da\u30fc\u30b9",
    "low-poly 3D render, isometric, pastel colors, blender",
    "portrait of a woman, (freckles:1.3), (red hair:0.9), ((blue eyes))",
    "negative: lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit",
    "weight\u2019s and o\u2019clock with U+2019",
    "\u00bfQu\u00e9 tal? \u00a1Ol\u00e9!",
    "\u2014em dash\u2013en dash\u2026ellipsis",
]


def main() -> int:
    hf = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_HF
    try:
        import ftfy  # noqa: F401
    except ImportError:
        pass
    else:
        print("ftfy is importable: CLIPTokenizer would use ftfy.fix_text; run in an environment without it", file=sys.stderr)
        return 1
    import regex
    import tokenizers
    import transformers
    import unicodedata
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    slow = CLIPTokenizer.from_pretrained(hf)
    assert slow.fix_text is None, "slow tokenizer picked up ftfy"
    fast = CLIPTokenizerFast.from_pretrained(hf)
    bos, eos = slow.bos_token_id, slow.eos_token_id
    cases = []
    for p in PROMPTS:
        ids = slow(p, add_special_tokens=False)["input_ids"]
        padded = slow(p, padding="max_length", max_length=MAX_LEN, truncation=True)["input_ids"]
        body = ids[: MAX_LEN - 2]
        assert padded == [bos] + body + [eos] + [eos] * (MAX_LEN - 2 - len(body)), p
        unpadded = slow(p, max_length=MAX_LEN, truncation=True)["input_ids"]
        zero = unpadded + [0] * (MAX_LEN - len(unpadded))
        fast_ids = fast(p, add_special_tokens=False)["input_ids"]
        cases.append({"prompt": p, "ids": ids, "padded_eos": padded, "padded_zero": zero, "fast_ids": fast_ids})
    meta = {
        "python": sys.version.split()[0],
        "unicodedata": unicodedata.unidata_version,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "regex": regex.__version__,
        "ftfy": False,
        "source": "openai/clip-vit-large-patch14 (shared/data/clip/hf)",
        "max_length": MAX_LEN,
        "bos": bos,
        "eos": eos,
    }
    # One case per line keeps the file reviewable in diffs.
    lines = ["{", f'"generator": {json.dumps(meta)},', '"cases": [']
    lines += [json.dumps(c, ensure_ascii=True) + ("," if i + 1 < len(cases) else "") for i, c in enumerate(cases)]
    lines += ["]", "}"]
    with open(OUT, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    differ = sum(c["ids"] != c["fast_ids"] for c in cases)
    print(f"{OUT}: {len(cases)} prompts; CLIPTokenizerFast differs on {differ}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
