//! Property tests of the value objects: they hold for any input, not just the examples.

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use identity::{
    Email, LockoutPolicy, Password, PasswordError, PasswordPolicy, RecoveryCommand,
    RecoveryDecision, RecoveryEvent, RecoveryKind, RecoveryNonce, RecoveryPolicy, RecoveryState,
    decide_recovery,
};
use proptest::prelude::*;

/// Addresses of plausible shape, any non-control Unicode in each part.
fn unicode_address() -> impl Strategy<Value = String> {
    "[^\\p{C}\\s@.]{1,20}@[^\\p{C}\\s@.]{1,12}\\.[^\\p{C}\\s@.]{1,6}"
}

/// ASCII addresses of plausible shape, mixed case.
fn ascii_address() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._%+-]{1,30}@[A-Za-z0-9-]{1,20}(\\.[A-Za-z]{2,6}){1,2}"
}

proptest! {
    #[test]
    fn parsing_any_string_never_panics(input in any::<String>()) {
        let _ = Email::parse(&input);
    }

    #[test]
    fn parsing_an_address_again_gives_the_same_email(input in unicode_address()) {
        let email = Email::parse(&input);
        // A few characters turn into `@`, `.` or a space under NFKC and are rightly refused.
        prop_assume!(email.is_ok());
        let email = email.unwrap();
        prop_assert_eq!(Email::parse(email.as_str()), Ok(email.clone()));
    }

    #[test]
    fn normalising_an_email_key_again_changes_nothing(input in unicode_address()) {
        let email = Email::parse(&input);
        prop_assume!(email.is_ok());
        let email = email.unwrap();
        let again = Email::parse(email.normalized()).unwrap();
        prop_assert_eq!(again.normalized(), email.normalized());
        prop_assert_eq!(again.as_str(), email.normalized());
    }

    #[test]
    fn the_email_key_ignores_letter_case(input in ascii_address()) {
        let email = Email::parse(&input).unwrap();
        let upper = Email::parse(&input.to_uppercase()).unwrap();
        let lower = Email::parse(&input.to_lowercase()).unwrap();
        prop_assert_eq!(upper.normalized(), email.normalized());
        prop_assert_eq!(lower.normalized(), email.normalized());
        prop_assert_eq!(email.as_str(), input.as_str());
    }

    #[test]
    fn the_email_key_ignores_surrounding_whitespace(input in unicode_address(), pad in "[ \\t\\n]{0,3}") {
        let padded = format!("{pad}{input}{pad}");
        prop_assert_eq!(Email::parse(&padded), Email::parse(&input));
    }

    #[test]
    fn a_password_is_accepted_exactly_within_the_policy_lengths(
        length in 0usize..200,
        min_chars in 0usize..20,
        extra in 0usize..150,
    ) {
        let policy = PasswordPolicy { min_chars, max_chars: min_chars + extra };
        let result = Password::new("x".repeat(length), &policy);
        if length < policy.min_chars {
            prop_assert_eq!(result, Err(PasswordError::TooShort { min_chars }));
        } else if length > policy.max_chars {
            prop_assert_eq!(result, Err(PasswordError::TooLong { max_chars: policy.max_chars }));
        } else {
            prop_assert!(result.is_ok());
        }
    }

    #[test]
    fn an_accepted_password_is_within_every_limit(input in any::<String>()) {
        let policy = PasswordPolicy::default();
        if let Ok(password) = Password::new(input, &policy) {
            let chars = password.expose().chars().count();
            prop_assert!(chars >= policy.min_chars && chars <= policy.max_chars);
            prop_assert!(password.expose().len() <= Password::MAX_BYTES);
        }
    }

    #[test]
    fn the_lockout_grows_with_failures_and_never_exceeds_its_maximum(failures in 0u32..100) {
        let policy = LockoutPolicy::default();
        let now = policy.lockout_after(failures);
        let next = policy.lockout_after(failures + 1);
        prop_assert!(now <= next);
        prop_assert!(next.is_none_or(|lockout| lockout <= policy.max_lockout));
    }

    #[test]
    fn an_account_never_gets_more_mails_in_an_hour_than_the_limit_and_never_fewer(
        steps in proptest::collection::vec((0i64..1200, 0u8..4), 0..60),
    ) {
        // Link mails and notices each have the limit, counted apart.
        let policy = RecoveryPolicy::default();
        let limit = usize::try_from(policy.max_mails_per_hour).unwrap();
        let hour = TimeDelta::hours(1);
        let to = Email::parse("ann@example.com").unwrap();
        let mut now = Utc.with_ymd_and_hms(2025, 3, 14, 9, 26, 53).unwrap();
        let mut last: Option<RecoveryEvent> = None;
        let (mut links, mut notices): (Vec<DateTime<Utc>>, Vec<DateTime<Utc>>) = (vec![], vec![]);
        for (n, (gap_secs, which)) in steps.into_iter().enumerate() {
            now += TimeDelta::seconds(gap_secs);
            let mut bytes = [0; RecoveryNonce::LEN];
            bytes[0] = u8::try_from(n).unwrap();
            let nonce = RecoveryNonce::from_bytes(bytes);
            let request = |kind, new_email| RecoveryCommand::Request {
                kind, to: to.clone(), new_email, nonce, account_epoch: 0, password_hash: None,
            };
            let command = match which {
                0 => request(RecoveryKind::ResetPassword, None),
                1 => request(RecoveryKind::VerifyEmail, None),
                2 => request(RecoveryKind::ChangeEmail, Some(to.clone())),
                _ => RecoveryCommand::NoticeRegistrationAttempt { to: to.clone() },
            };
            let sent = if which == 3 { &mut notices } else { &mut links };
            let state = RecoveryState::from_last(last.as_ref());
            let decision = decide_recovery(&state, command, now, &policy).unwrap();
            let within_the_hour = sent.iter().filter(|at| now < **at + hour).count();
            prop_assert_eq!(
                matches!(decision, RecoveryDecision::OverLimit),
                within_the_hour >= limit
            );
            if let Some(event) = decision.into_event() {
                sent.push(now);
                let after = event.state().known().expect("a decision writes a known state");
                prop_assert!(after.recent_mails.len() <= limit);
                prop_assert!(after.recent_notices.len() <= limit);
                last = Some(event);
            }
        }
        for sent in [&links, &notices] {
            for (i, at) in sent.iter().enumerate() {
                let in_the_hour_up_to_it = sent[..=i].iter().filter(|m| *at < **m + hour).count();
                prop_assert!(in_the_hour_up_to_it <= limit);
            }
        }
    }
}
