//! Checks of a pipeline's SQL that need no data: syntax, and the fields an expression names.

use deltalake::datafusion::sql::sqlparser::ast::{visit_expressions, Expr};
use deltalake::datafusion::sql::sqlparser::dialect::GenericDialect;
use deltalake::datafusion::sql::sqlparser::parser::Parser;
use deltalake::datafusion::sql::sqlparser::tokenizer::Token;
use sluice_core::pipeline::{EnrichConfig, StepConfig};
use sluice_core::{Config, ConfigError};
use std::ops::ControlFlow;

/// Parses one SQL expression; the error says what is wrong and where in the expression.
pub fn parse_expr(sql: &str) -> Result<Expr, String> {
    let dialect = GenericDialect {};
    let mut parser = Parser::new(&dialect).try_with_sql(sql).map_err(|e| e.to_string())?;
    let expr = parser.parse_expr().map_err(|e| e.to_string())?;
    let next = parser.peek_token();
    if next.token != Token::EOF {
        return Err(format!("unexpected `{}` after the expression at {}", next.token, next.span.start));
    }
    Ok(expr)
}

/// The top-level fields an expression reads (`a.b` and `a['b']` read `a`), as DataFusion
/// resolves them: unquoted names lower-cased.
pub fn referenced_fields(expr: &Expr) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let _ = visit_expressions(expr, |e| {
        let ident = match e {
            Expr::Identifier(i) => Some(i),
            Expr::CompoundIdentifier(parts) => parts.first(),
            _ => None,
        };
        if let Some(i) = ident {
            let name = if i.quote_style.is_some() { i.value.clone() } else { i.value.to_lowercase() };
            if !out.contains(&name) {
                out.push(name);
            }
        }
        ControlFlow::<()>::Continue(())
    });
    out
}

/// Checks the SQL of every pipeline in `cfg` (the rest of the spec was checked when the config
/// was loaded). Errors name the file, line and key of the step.
pub fn check_config(cfg: &Config) -> Result<(), ConfigError> {
    for (name, p) in &cfg.pipelines {
        for (sink, s) in &p.to {
            let mut exprs = Vec::new();
            match s {
                sluice_core::pipeline::SinkConfig::Redis(r) => {
                    exprs.push(("redis key", &r.key));
                    if let Some(g) = &r.geo {
                        exprs.extend([("redis geo.lat", &g.lat), ("redis geo.lng", &g.lng), ("redis geo.member", &g.member)]);
                    }
                }
                sluice_core::pipeline::SinkConfig::Postgres(pg) => exprs.extend(pg.delete_when.iter().map(|w| ("postgres delete_when", w))),
                sluice_core::pipeline::SinkConfig::Webhook(w) => {
                    if let Err(e) = crate::enrich::http_client(w.timeout, w.concurrency, w.ca_file.as_deref()) {
                        let key = vec!["pipelines".to_string(), name.clone(), "to".into(), sink.clone(), "webhook".into(), "ca_file".into()];
                        return Err(cfg.error_at(&key, e));
                    }
                }
                _ => {}
            }
            for (what, sql) in exprs {
                let key = vec!["pipelines".to_string(), name.clone(), "to".into(), sink.clone()];
                parse_expr(sql).map_err(|e| cfg.error_at(&key, format!("{what} `{sql}`: {e}")))?;
            }
        }
        for (i, step) in p.steps.iter().enumerate() {
            let key = |extra: &[&str]| {
                let mut k = vec!["pipelines".to_string(), name.clone(), "steps".into(), i.to_string()];
                k.extend(extra.iter().map(|s| s.to_string()));
                k
            };
            let bad = |extra: &[&str], sql: &str, e: String| cfg.error_at(&key(extra), format!("{} `{sql}`: {e}", step.kind()));
            match step {
                StepConfig::Filter(sql) => {
                    parse_expr(sql).map_err(|e| bad(&[], sql, e))?;
                }
                StepConfig::Map(f) | StepConfig::Select(f) => {
                    for (field, sql) in &f.0 {
                        parse_expr(sql).map_err(|e| bad(&[step.kind(), field], sql, e))?;
                    }
                }
                StepConfig::Route(routes) => {
                    for (j, r) in routes.iter().enumerate() {
                        if let Some(sql) = &r.when {
                            parse_expr(sql).map_err(|e| bad(&["route", &j.to_string()], sql, e))?;
                        }
                    }
                }
                StepConfig::Enrich(e) => {
                    if let Err(err) = crate::enrich::http_client(e.timeout, e.concurrency, e.ca_file.as_deref()) {
                        return Err(cfg.error_at(&key(&["enrich", "ca_file"]), err));
                    }
                    for (key, template) in [("url", Some(&e.url)), ("body", e.body.as_ref())] {
                        let Some(t) = template else { continue };
                        for sql in EnrichConfig::placeholders(t).unwrap_or_default() {
                            parse_expr(&sql).map_err(|err| bad(&["enrich", key], &sql, err))?;
                        }
                    }
                }
                StepConfig::Dedup(d) => {
                    parse_expr(&d.key).map_err(|e| bad(&["dedup", "key"], &d.key, e))?;
                }
                StepConfig::Lookup(l) => {
                    parse_expr(&l.key).map_err(|e| bad(&["lookup", "key"], &l.key, e))?;
                }
                // Compiled per schema when data arrives; the config checks covered its names.
                StepConfig::Validate(_) | StepConfig::Drop(_) => {}
            }
        }
    }
    Ok(())
}
