use super::*;

fn sample<'a>(completion: &'a str, answer: Option<&'a str>, tokens: usize) -> Sample<'a> {
    Sample { prompt: "12+30=", completion, answer, tokens }
}

fn score(configs: &[RewardConfig], s: &Sample) -> (Scored, Vec<String>) {
    let mut rewards = Rewards::new(configs).unwrap();
    let mut warnings = Vec::new();
    let scored = rewards.score(s, &mut |w| warnings.push(w));
    (scored, warnings)
}

#[test]
fn built_in_scorers() {
    let exact = RewardConfig::ExactMatch { weight: 1.0, extract: Some(r"=\s*(\S+)$".into()) };
    assert_eq!(score(&[exact.clone()], &sample("so 12+30= 42", Some("42"), 3)).0.total, Some(1.0));
    assert_eq!(score(&[exact.clone()], &sample("so 12+30= 41", Some("42"), 3)).0.total, Some(0.0));
    // No answer in the example: no value, so no reward at all.
    assert_eq!(score(&[exact], &sample("42", None, 1)).0.total, None);
    let plain = RewardConfig::ExactMatch { weight: 1.0, extract: None };
    assert_eq!(score(&[plain], &sample(" 42\n", Some("42"), 1)).0.total, Some(1.0));

    let numeric = RewardConfig::NumericMatch { weight: 2.0, extract: None, tolerance: 0.01 };
    assert_eq!(score(&[numeric.clone()], &sample("first 7, then 42.004", Some("42"), 5)).0.total, Some(2.0));
    assert_eq!(score(&[numeric.clone()], &sample("42.5", Some("42"), 2)).0.total, Some(0.0));
    assert_eq!(score(&[numeric], &sample("no number", Some("42"), 2)).0.total, Some(0.0));

    let format = RewardConfig::Regex { weight: 0.5, pattern: r"^\d+$".into() };
    assert_eq!(score(&[format.clone()], &sample("42", None, 1)).0.total, Some(0.5));
    assert_eq!(score(&[format], &sample("42 apples", None, 2)).0.total, Some(0.0));

    let target = RewardConfig::Length { weight: 1.0, target: Some(10), max: None };
    assert_eq!(score(&[target], &sample("x", None, 15)).0.total, Some(-0.5));
    let max = RewardConfig::Length { weight: 1.0, target: None, max: Some(8) };
    assert_eq!(score(&[max.clone()], &sample("x", None, 4)).0.total, Some(0.0));
    assert_eq!(score(&[max], &sample("x", None, 12)).0.total, Some(-0.5));

    let contains = RewardConfig::Contains { weight: 1.0, text: "</answer>".into() };
    assert_eq!(score(&[contains], &sample("<answer>4</answer>", None, 4)).0.total, Some(1.0));
}

#[test]
fn weighted_sum_and_per_scorer_values() {
    let configs = [
        RewardConfig::ExactMatch { weight: 1.0, extract: None },
        RewardConfig::Contains { weight: 0.25, text: "4".into() },
        RewardConfig::Length { weight: 0.5, target: Some(2), max: None },
    ];
    let (s, _) = score(&configs, &sample("42", Some("42"), 3));
    assert_eq!(s.per_scorer, vec![Some(1.0), Some(1.0), Some(-0.5)]);
    assert_eq!(s.total, Some(1.0 + 0.25 - 0.25));
}

#[test]
fn bad_configs_are_refused_with_the_reason() {
    let err = Rewards::new(&[RewardConfig::Regex { weight: 1.0, pattern: "(".into() }]).err().unwrap().to_string();
    assert!(err.contains("reward 0 (regex)") && err.contains("not a valid regex"), "{err}");
    assert!(Rewards::new(&[RewardConfig::Length { weight: 1.0, target: None, max: None }]).is_err());
    assert!(Rewards::new(&[RewardConfig::Length { weight: 1.0, target: Some(0), max: None }]).is_err());
    assert!(Rewards::new(&[RewardConfig::Command { weight: 1.0, argv: vec![], timeout_s: 1.0 }]).is_err());
    assert!(Rewards::new(&[RewardConfig::Command { weight: 1.0, argv: vec!["true".into()], timeout_s: 0.0 }]).is_err());
    // As a recipe would spell them.
    let parsed: RewardConfig = toml::from_str("type = \"numeric_match\"\ntolerance = 0.5").unwrap();
    assert_eq!(parsed, RewardConfig::NumericMatch { weight: 1.0, extract: None, tolerance: 0.5 });
    assert!(toml::from_str::<RewardConfig>("type = \"contains\"\ntext = \"a\"\ntxet = 1").is_err());
}

fn command(script: &str, timeout_s: f64) -> RewardConfig {
    RewardConfig::Command { weight: 1.0, argv: vec!["sh".into(), "-c".into(), script.into()], timeout_s }
}

#[test]
fn reward_commands_that_work_hang_crash_or_babble() {
    // A good program: answers every request, and sees the completion and the answer.
    let good = command(r#"while read -r line; do case "$line" in *'"completion":"42"'*'"answer":"42"'*) echo '{"reward": 1.0}';; *) echo '{"reward": 0.25}';; esac; done"#, 5.0);
    let mut rewards = Rewards::new(&[good]).unwrap();
    let mut warnings = Vec::new();
    for _ in 0..3 {
        assert_eq!(rewards.score(&sample("42", Some("42"), 1), &mut |w| warnings.push(w)).total, Some(1.0));
        assert_eq!(rewards.score(&sample("41", Some("42"), 1), &mut |w| warnings.push(w)).total, Some(0.25));
    }
    assert!(warnings.is_empty(), "{warnings:?}");

    // Each failure is a null reward and a warning, never a hang or a panic; a second call
    // after a kill or a crash starts the program again.
    let cases = [
        ("sleeps", command("read -r line; sleep 5", 0.3), "no answer within"),
        ("crashes", command("read -r line; exit 3", 5.0), "exited"),
        ("babbles", command("while read -r line; do echo 'hello'; done", 5.0), "not a JSON line"),
        ("says null", command(r#"while read -r line; do echo '{"reward": null}'; done"#, 5.0), ""),
        ("missing", RewardConfig::Command { weight: 1.0, argv: vec!["/nonexistent/reward-program".into()], timeout_s: 1.0 }, "could not start"),
    ];
    for (what, config, expect) in cases {
        let mut rewards = Rewards::new(&[config, RewardConfig::Contains { weight: 0.5, text: "4".into() }]).unwrap();
        for _ in 0..2 {
            let started = std::time::Instant::now();
            let mut warnings = Vec::new();
            let s = rewards.score(&sample("42", Some("42"), 1), &mut |w| warnings.push(w));
            assert!(started.elapsed() < std::time::Duration::from_secs(4), "{what}: took {:?}", started.elapsed());
            assert_eq!(s.per_scorer[0], None, "{what}");
            // The other scorer still counts.
            assert_eq!(s.total, Some(0.5), "{what}");
            if expect.is_empty() {
                assert!(warnings.is_empty(), "{what}: {warnings:?}");
            } else {
                assert!(warnings.len() == 1 && warnings[0].contains(expect), "{what}: {warnings:?}");
            }
        }
    }
    // Alone, a failed scorer leaves the completion without a reward.
    let mut alone = Rewards::new(&[command("read -r line; exit 1", 5.0)]).unwrap();
    assert_eq!(alone.score(&sample("42", None, 1), &mut |_| {}).total, None);
}
