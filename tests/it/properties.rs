//! Property tests: no input reachable from a user or a file panics. Prompts-file parsing,
//! the tokenizer, config files (parsed, validated, and the network they describe built and
//! run), size rules and request validation, on arbitrary input.
//!
//! CI runs proptest's default 256 cases per property; for a longer run:
//! `PROPTEST_CASES=20000 cargo test --release --test it properties::`.

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use proptest::prelude::*;
use wuerstchen::config::{ClipTextConfig, DecoderConfig, PriorConfig, SchedulerConfig, VqganConfig};
use wuerstchen::models::{PaellaVqDecoder, WuerstchenDiffNeXt, WuerstchenPrior};
use wuerstchen::pipeline::SizeRule;
use wuerstchen::request::{generate_request, SamplingInput};
use wuerstchen::tokenizer::ClipTokenizer;

fn tokenizer() -> &'static ClipTokenizer {
    static T: OnceLock<ClipTokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let src = wuerstchen::hub::LocalDir::new(crate::common::fixtures().join("tiny-a/prior"));
        ClipTokenizer::load(&src, "tokenizer").unwrap()
    })
}

/// A JSON value of any kind, to throw at config parsers.
fn any_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(Into::into),
        any::<i64>().prop_map(Into::into),
        (-1e6f64..1e6).prop_map(Into::into),
        (0u64..70).prop_map(Into::into),
        "[a-zA-Z_]{0,6}".prop_map(Into::into),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| prop::collection::vec(inner, 0..5).prop_map(Into::into))
}

const CONFIG_KEYS: &[&str] = &[
    "c_in",
    "c",
    "c_cond",
    "c_r",
    "depth",
    "nhead",
    "c_out",
    "patch_size",
    "c_hidden",
    "blocks",
    "level_config",
    "inject_effnet",
    "effnet_embd",
    "clip_embd",
    "kernel_size",
    "levels",
    "bottleneck_blocks",
    "embed_dim",
    "latent_channels",
    "scale_factor",
    "up_down_scale_factor",
    "out_channels",
    "scaler",
    "s",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "vocab_size",
];

fn any_config_object() -> impl Strategy<Value = String> {
    prop::collection::btree_map(prop::sample::select(CONFIG_KEYS), any_json(), 0..8).prop_map(|m| {
        let obj: serde_json::Map<String, serde_json::Value> = m.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        serde_json::Value::Object(obj).to_string()
    })
}

/// Fresh variables for a network: whatever it asks for is created (zeros) and recorded.
fn var_builder() -> (VarMap, VarBuilder<'static>) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    (vm, vb)
}

fn small_decoder_config() -> impl Strategy<Value = DecoderConfig> {
    (1usize..4).prop_flat_map(|levels| {
        (
            prop::collection::vec(1usize..9, levels),
            prop::collection::vec(-1i64..4, levels),
            prop::collection::vec(0usize..3, levels),
            prop::collection::vec("[CTA]{0,3}", levels),
            prop::collection::vec(any::<bool>(), levels),
            (
                1usize..5,
                1usize..5,
                1usize..9,
                prop::sample::select(vec![1usize, 3, 5]),
                1usize..3,
                4usize..9,
            ),
        )
            .prop_map(
                |(
                    c_hidden,
                    nhead,
                    blocks,
                    level_config,
                    inject_effnet,
                    (effnet_embd, clip_embd, c_cond, kernel_size, patch_size, c_r),
                )| {
                    DecoderConfig {
                        c_in: 4,
                        c_out: 4,
                        c_r,
                        patch_size,
                        c_cond,
                        c_hidden,
                        nhead,
                        blocks,
                        level_config,
                        inject_effnet,
                        effnet_embd,
                        clip_embd,
                        kernel_size,
                    }
                },
            )
    })
}

proptest! {
    // about half the random decoder configs are invalid (nhead not dividing c_hidden): allow the rejects
    #![proptest_config(ProptestConfig { max_global_rejects: 1 << 20, ..ProptestConfig::default() })]

    #[test]
    fn prompts_files_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400), text in ".{0,200}") {
        for input in [bytes.as_slice(), text.as_bytes()] {
            let entries = wuerstchen::prompts::parse("f", input);
            let mut last = 0;
            for e in entries.iter().flatten() {
                prop_assert!(e.line > last);
                last = e.line;
            }
        }
    }

    #[test]
    fn json_prompt_lines_never_panic(obj in any_config_object(), prompt in ".{0,40}") {
        let line = format!("{{\"prompt\": {}, {}", serde_json::Value::from(prompt), &obj[1..]);
        let entries = wuerstchen::prompts::parse("f", line.as_bytes());
        for e in entries.into_iter().flatten() {
            let s = SamplingInput { width: 128, height: 128, prior_guidance: 4.0, num_images: 1, ..Default::default() };
            let _ = wuerstchen::request::job_from_entry("f", &e, &s, "", 0);
        }
    }

    #[test]
    fn the_tokenizer_takes_any_text(text in "\\PC{0,300}") {
        let t = tokenizer().encode(&text).unwrap();
        prop_assert_eq!(t.ids.len(), 77);
        prop_assert_eq!(t.attention_mask.len(), 77);
        prop_assert_eq!(t.ids[0], 49406);
        let len = t.attention_mask.iter().take_while(|m| **m == 1).count();
        prop_assert!(t.attention_mask[len..].iter().all(|m| *m == 0));
        prop_assert_eq!(t.ids[len - 1], 49407);
    }

    #[test]
    fn config_files_parse_or_fail_cleanly(text in any_config_object()) {
        if let Ok(c) = serde_json::from_str::<PriorConfig>(&text) { let _ = c.validate(); }
        if let Ok(c) = serde_json::from_str::<DecoderConfig>(&text) {
            if c.validate().is_ok() {
                let _ = c.level_blocks(0);
                let _ = c.downscale();
            }
        }
        if let Ok(c) = serde_json::from_str::<VqganConfig>(&text) { let _ = c.validate(); }
        if let Ok(c) = serde_json::from_str::<SchedulerConfig>(&text) { let _ = c.validate(); }
        if let Ok(c) = serde_json::from_str::<ClipTextConfig>(&text) { let _ = c.validate("text_encoder"); }
    }

    #[test]
    fn any_valid_decoder_config_builds_and_runs(cfg in small_decoder_config(), h in 1usize..40, w in 1usize..40) {
        prop_assume!(cfg.validate().is_ok());
        let (_vm, vb) = var_builder();
        let net = WuerstchenDiffNeXt::new(&cfg, vb).unwrap();
        let dev = Device::Cpu;
        let effnet = Tensor::randn(0f32, 1., (1, cfg.effnet_embd, 3, 2), &dev).unwrap();
        let clip = Tensor::randn(0f32, 1., (1, 5, cfg.clip_embd), &dev).unwrap();
        let x = Tensor::randn(0f32, 1., (1, 4, h, w), &dev).unwrap();
        let r = Tensor::new(&[0.5f32], &dev).unwrap();
        // sizes the decoder cannot take are errors (the size rule keeps users away from them), never panics
        if let Ok(cond) = net.condition(&effnet, &clip, (h, w)) {
            if let Ok(y) = net.forward(&x, &r, &cond) {
                prop_assert_eq!(y.dims(), x.dims());
            }
        }
    }

    #[test]
    fn any_valid_prior_config_builds_and_runs(c in 1usize..12, nhead in 1usize..4, depth in 1usize..3, c_r in 4usize..9, c_in in 1usize..5, h in 1usize..6, w in 1usize..6) {
        let cfg = PriorConfig { c_in, c: c * nhead, c_cond: 3, c_r, depth, nhead };
        prop_assert!(cfg.validate().is_ok());
        let (_vm, vb) = var_builder();
        let net = WuerstchenPrior::new(&cfg, vb).unwrap();
        let dev = Device::Cpu;
        let cond = net.condition(&Tensor::randn(0f32, 1., (2, 4, 3), &dev).unwrap()).unwrap();
        let x = Tensor::randn(0f32, 1., (2, c_in, h, w), &dev).unwrap();
        let y = net.forward(&x, &Tensor::new(&[0.9f32, 0.1], &dev).unwrap(), &cond).unwrap();
        prop_assert_eq!(y.dims(), x.dims());
    }

    #[test]
    fn any_valid_vqgan_config_builds_and_decodes(levels in 1usize..4, bottleneck in 0usize..3, embed in 1usize..40, f in 1usize..3, lat in 1usize..5, h in 1usize..5) {
        let cfg = VqganConfig { levels, bottleneck_blocks: bottleneck, embed_dim: embed, up_down_scale_factor: f, latent_channels: lat, ..Default::default() };
        prop_assume!(cfg.validate().is_ok());
        let (_vm, vb) = var_builder();
        let net = PaellaVqDecoder::new(&cfg, vb).unwrap();
        let x = Tensor::randn(0f32, 1., (1, lat, h, h + 1), &Device::Cpu).unwrap();
        let y = net.decode(&x).unwrap();
        prop_assert_eq!(y.dims(), &[1, 3, h * cfg.upscale(), (h + 1) * cfg.upscale()]);
    }

    #[test]
    fn size_rules_never_panic(px in any::<usize>(), rm in 1e-3f64..1e4, lds in 1e-3f64..1e3, down in 1usize..64, up in 1usize..64) {
        let rule = SizeRule { resolution_multiple: rm, latent_dim_scale: lds, decoder_downscale: down, vqgan_upscale: up };
        let small = px % 5000;
        if let Err(e) = rule.check("--width", small) {
            prop_assert!(e.to_string().contains("--width"));
        } else {
            prop_assert_eq!(rule.produced(small), Some(small));
        }
        let _ = rule.produced(px);
    }

    #[test]
    fn request_validation_never_panics(
        w in any::<usize>(), h in any::<usize>(), g in any::<f64>(), dg in any::<f64>(), n in any::<usize>(),
        steps in proptest::option::of(0usize..100), ts in proptest::option::of(prop::collection::vec(any::<f64>(), 0..6)),
    ) {
        let s = SamplingInput { width: w, height: h, prior_steps: steps, prior_timesteps: ts, prior_guidance: g, decoder_steps: Some(1), decoder_timesteps: None, decoder_guidance: dg, num_images: n };
        if let Ok(r) = generate_request("x", "", &s, 0) {
            prop_assert!(r.prior_timesteps.len() >= 2 && r.prior_guidance.is_finite() && r.num_images > 0);
        }
    }

    #[test]
    fn shard_and_device_specs_never_panic(s in ".{0,12}") {
        let _ = wuerstchen::prompts::Shard::parse(&s);
        let _ = wuerstchen::request::parse_device(&s);
        let _ = wuerstchen::request::parse_dtype(&s);
        let _ = wuerstchen::request::parse_rng(&s);
    }
}
