//! The mails the tests' SMTP catcher received from the service's mailer, and the links in them.

use std::time::Duration;

use test_support::{ReceivedMail, SmtpCatcher};

/// `mail.link_base_url` in the tests that read links: a link's token follows it.
pub const LINK_BASE: &str = "https://id.example.net";

/// How long a mail may take from the request to the SMTP server.
const MAIL_WITHIN: Duration = Duration::from_secs(30);

/// The mails to `address` (in any case) received so far, oldest first, once there are at least
/// `count`.
pub async fn mails_to(smtp: &SmtpCatcher, address: &str, count: usize) -> Vec<ReceivedMail> {
    let deadline = tokio::time::Instant::now() + MAIL_WITHIN;
    loop {
        let mails: Vec<_> = smtp
            .received()
            .into_iter()
            .filter(|mail| mail.to.iter().any(|to| to.eq_ignore_ascii_case(address)))
            .collect();
        if mails.len() >= count {
            return mails;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {count} mails to {address} arrived: {:?}",
            mails.len(),
            smtp.received()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The token of the link to `path` in `mail`'s text, checking the HTML part has the same link.
pub fn link_token(mail: &ReceivedMail, path: &str) -> String {
    let text = mail.text.as_deref().expect("no text part");
    let prefix = format!("{LINK_BASE}{path}?token=");
    let start = text
        .find(&prefix)
        .unwrap_or_else(|| panic!("no link to {path}: {text}"))
        + prefix.len();
    let token: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        .collect();
    let html = mail.html.as_deref().expect("no HTML part");
    assert!(html.contains(&format!("{prefix}{token}")), "{html}");
    token
}
