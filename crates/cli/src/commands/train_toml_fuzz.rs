//! `qlora train --config train.toml` with hostile files: byte mutations of a
//! valid config give options or an error naming the file, never a panic.

use proptest::prelude::*;

use super::{with_config_file, Args};

const BASE: &str = "model = \"m\"\ndata = \"d.jsonl\"\nout = \"o\"\nquant = \"none\"\nbatch-size = 2\nmax_steps = 6\nlr = 5e-3\nschedule = \"cosine\"\nwarmup-steps = 2\nseed = 3\neval_split = 0.1\npacking = true\ntarget = \"q_proj,v_proj\"\n";

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_toml_configs_never_panic(
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in prop::option::of(any::<usize>()),
    ) {
        let mut b = BASE.as_bytes().to_vec();
        for (i, x) in edits {
            let n = b.len();
            b[i % n] = x;
        }
        if let Some(c) = cut {
            b.truncate(c % b.len());
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("train.toml");
        std::fs::write(&p, &b).unwrap();
        let a = Args {
            config: Some(p.clone()),
            ..Default::default()
        };
        if let Err(e) = with_config_file(a) {
            prop_assert!(format!("{e:#}").contains("train.toml"), "{e:#}");
        }
    }
}
