use proptest::prelude::*;

use super::*;

fn usd(text: f64) -> Usd {
    Usd::from_config(text).unwrap()
}

#[test]
fn config_amounts_convert_exactly() {
    assert_eq!(usd(0.6).pico(), 600_000_000_000);
    assert_eq!(usd(0.075).pico(), 75_000_000_000);
    assert_eq!(usd(50.0).pico(), 50 * PICO_PER_USD);
    assert_eq!(Usd::from_config(-0.01), None);
    assert_eq!(Usd::from_config(f64::NAN), None);
    assert_eq!(Usd::from_config(2e6), None);
}

#[test]
fn amounts_print_as_exact_decimals() {
    assert_eq!(usd(5.0).to_string(), "5.0");
    assert_eq!(Usd::from_pico(3_600_000).to_string(), "0.0000036");
    assert_eq!(Usd::from_pico(-1).to_string(), "-0.000000000001");
}

#[test]
fn per_token_price_matches_the_formula() {
    let pricing = Pricing::PerToken {
        input_per_mtok: usd(0.6),
        output_per_mtok: usd(2.4),
        cached_input_per_mtok: None,
        cache_write_per_mtok: None,
    };
    // 1000 * 0.60 / 1e6 + 500 * 2.40 / 1e6 = 0.0006 + 0.0012
    assert_eq!(pricing.price_tokens(&Usage::new(1000, 500)), usd(0.0018));
}

#[test]
fn cached_prompt_tokens_are_priced_once_at_the_cached_price() {
    let pricing = Pricing::PerToken {
        input_per_mtok: usd(1.0),
        output_per_mtok: usd(2.0),
        cached_input_per_mtok: Some(usd(0.1)),
        cache_write_per_mtok: None,
    };
    let usage = Usage {
        prompt_tokens: 1000,
        completion_tokens: 0,
        prompt_tokens_details: Some(crate::openai::PromptTokensDetails { cached_tokens: 600, cache_write_tokens: 0 }),
    };
    // 400 uncached at 1.00 + 600 cached at 0.10
    assert_eq!(pricing.price_tokens(&usage), usd(0.00046));
    // Without a cached price, cached tokens cost the normal price, still once.
    let plain = Pricing::PerToken {
        input_per_mtok: usd(1.0),
        output_per_mtok: usd(2.0),
        cached_input_per_mtok: None,
        cache_write_per_mtok: None,
    };
    assert_eq!(plain.price_tokens(&usage), usd(0.001));
}

#[test]
fn anthropic_cache_reads_and_writes_are_priced_at_their_own_prices_once() {
    // Claude-like prices: 3.00 in, 15.00 out, 0.30 cache read, 3.75 cache write.
    let pricing = Pricing::PerToken {
        input_per_mtok: usd(3.0),
        output_per_mtok: usd(15.0),
        cached_input_per_mtok: Some(usd(0.3)),
        cache_write_per_mtok: Some(usd(3.75)),
    };
    // 100 fresh + 1000 read + 2000 written = 3100 prompt tokens (OpenAI's convention).
    let usage = Usage {
        prompt_tokens: 3100,
        completion_tokens: 10,
        prompt_tokens_details: Some(crate::openai::PromptTokensDetails {
            cached_tokens: 1000,
            cache_write_tokens: 2000,
        }),
    };
    // 100 * 3 + 1000 * 0.3 + 2000 * 3.75 + 10 * 15 = 300 + 300 + 7500 + 150 = 8250 per 1e6
    assert_eq!(pricing.price_tokens(&usage), usd(0.00825));
    // More written and read than the prompt holds (a broken upstream): never below zero fresh.
    let odd = Usage {
        prompt_tokens: 1000,
        completion_tokens: 0,
        prompt_tokens_details: Some(crate::openai::PromptTokensDetails { cached_tokens: 800, cache_write_tokens: 800 }),
    };
    // 800 read at 0.3 + 200 written at 3.75
    assert_eq!(pricing.price_tokens(&odd), usd(0.00099));
}

#[test]
fn an_hourly_estimate_is_the_exclusive_time_at_the_expected_speed() {
    let pricing = Pricing::PerHour { hourly_usd: usd(0.36) };
    // 200 tokens at 20 tokens/s = 10 s of a $0.36/h server = $0.001
    assert_eq!(pricing.estimate(50, 200, 20), usd(0.001));
}

#[test]
fn the_affordable_completion_is_the_largest_that_fits() {
    let per_token = Pricing::PerToken {
        input_per_mtok: usd(1.0),
        output_per_mtok: usd(2.0),
        cached_input_per_mtok: None,
        cache_write_per_mtok: None,
    };
    // $0.001 pays 100 prompt tokens ($0.0001) and 450 completion tokens ($0.0009).
    assert_eq!(per_token.affordable_completion(100, usd(0.001), 20), 450);
    assert_eq!(per_token.affordable_completion(2000, usd(0.001), 20), 0, "the prompt alone is over");
    let per_hour = Pricing::PerHour { hourly_usd: usd(0.36) };
    // $0.001 buys 10 s at 20 tokens/s.
    assert_eq!(per_hour.affordable_completion(50, usd(0.001), 20), 200);
}

proptest! {
    #[test]
    fn the_affordable_completion_fits_and_one_more_does_not(
        input in 0i64..5_000_000_000_000, output in 1i64..5_000_000_000_000, prompt in 0u64..10_000, budget in 0i64..1_000_000_000_000,
    ) {
        let pricing = Pricing::PerToken {
            input_per_mtok: Usd::from_pico(input),
            output_per_mtok: Usd::from_pico(output),
            cached_input_per_mtok: None, cache_write_per_mtok: None,
        };
        let budget = Usd::from_pico(budget);
        let n = pricing.affordable_completion(prompt, budget, 20);
        if pricing.estimate(prompt, 0, 20) <= budget {
            prop_assert!(pricing.estimate(prompt, n, 20) <= budget);
            prop_assert!(pricing.estimate(prompt, n + 1, 20) > budget);
        } else {
            prop_assert_eq!(n, 0);
        }
    }

    #[test]
    fn per_token_cost_is_additive_over_requests(
        input in 0u32..100_000_000, output in 0u32..100_000_000,
        a in 0u64..200_000, b in 0u64..200_000, c in 0u64..200_000, d in 0u64..200_000,
    ) {
        // Prices with up to 6 decimals per Mtok make each token an exact number of pico-USD,
        // so the sum of the parts equals the price of the whole.
        let pricing = Pricing::PerToken {
            input_per_mtok: Usd::from_pico(i64::from(input) * 1_000_000),
            output_per_mtok: Usd::from_pico(i64::from(output) * 1_000_000),
            cached_input_per_mtok: None, cache_write_per_mtok: None,
        };
        let whole = pricing.price_tokens(&Usage::new(a + c, b + d));
        let parts = pricing.price_tokens(&Usage::new(a, b)).saturating_add(pricing.price_tokens(&Usage::new(c, d)));
        prop_assert_eq!(whole, parts);
    }

    #[test]
    fn cached_tokens_never_cost_more_than_uncached(prompt in 0u64..1_000_000, cached in 0u64..2_000_000) {
        let pricing = Pricing::PerToken {
            input_per_mtok: Usd::from_pico(3_000_000_000_000),
            output_per_mtok: Usd::from_pico(0),
            cached_input_per_mtok: Some(Usd::from_pico(300_000_000_000)), cache_write_per_mtok: None,
        };
        let with_cache = Usage {
            prompt_tokens: prompt,
            completion_tokens: 0,
            prompt_tokens_details: Some(crate::openai::PromptTokensDetails { cached_tokens: cached, cache_write_tokens: 0 }),
        };
        prop_assert!(pricing.price_tokens(&with_cache) <= pricing.price_tokens(&Usage::new(prompt, 0)));
        prop_assert!(pricing.price_tokens(&with_cache) >= Usd::ZERO);
    }

    #[test]
    fn config_amounts_round_trip_through_display(pico in 0i64..1_000_000_000_000_000) {
        let amount = Usd::from_pico(pico);
        let parsed: f64 = amount.to_string().parse().unwrap();
        // Display is exact; f64 parsing of it lands within one pico for amounts this size.
        prop_assert!((Usd::from_config(parsed).unwrap().pico() - pico).abs() <= 1);
    }
}

#[test]
fn savings_are_the_baseline_price_of_the_same_usage_minus_the_cost_never_negative() {
    let per_mtok = |usd: i64| Usd::from_pico(usd * 1_000_000_000_000);
    let premium = Baseline {
        pricing: Pricing::PerToken {
            input_per_mtok: per_mtok(2),
            output_per_mtok: per_mtok(8),
            cached_input_per_mtok: None,
            cache_write_per_mtok: None,
        },
        tokens_per_s: 20,
    };
    let usage = Usage::new(1_000, 500); // 1000 × 2 + 500 × 8 = 6000 µ$
    assert_eq!(premium.price(&usage), Usd::from_pico(6_000_000_000));
    assert_eq!(premium.savings(&usage, Usd::from_pico(1_000_000_000)), Usd::from_pico(5_000_000_000));
    assert_eq!(premium.savings(&usage, Usd::from_pico(7_000_000_000)), Usd::ZERO);
    // An hourly baseline: the completion's exclusive time at its expected speed.
    let hourly = Baseline { pricing: Pricing::PerHour { hourly_usd: per_mtok(36) }, tokens_per_s: 50 };
    assert_eq!(hourly.price(&usage), Usd::from_pico(100_000_000_000)); // 10 s at $0.01/s
}
