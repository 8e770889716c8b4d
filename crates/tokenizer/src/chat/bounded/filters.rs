//! Every builtin filter of the chat-template environment, charged against the render's
//! [`Budget`] (an upper bound of its result from its arguments) before it runs.

use super::*;

/// Sum of the numbers written in `fmt` (format widths and precisions).
pub(super) fn digit_sum(fmt: &str) -> u128 {
    fmt.split(|c: char| !c.is_ascii_digit())
        .filter(|d| !d.is_empty())
        .map(|d| d.parse::<u128>().unwrap_or(u128::MAX))
        .fold(0u128, u128::saturating_add)
}

/// An integer argument (a width or count), 0 when absent or not a number.
fn int_arg(v: Option<&Value>) -> u128 {
    v.and_then(|v| {
        v.as_i64()
            .map(|n| n.max(0) as u128)
            .or_else(|| v.as_str().map(|s| s.len() as u128))
            .or_else(|| v.is_true().then_some(2))
    })
    .unwrap_or(0)
}

/// A keyword argument of a filter call (the last argument when it is kwargs).
fn kwarg(args: &[Value], name: &str) -> Option<Value> {
    let last = args.last()?;
    if last.kind() != ValueKind::Map || !last.is_kwargs() {
        return None;
    }
    last.get_attr(name).ok().filter(|v| !v.is_undefined())
}

/// Every builtin filter, charged before it runs.
pub(super) fn install_filters(env: &mut Environment<'_>, budget: &Arc<Budget>) {
    use minijinja::filters as f;
    /// Upper bound of a filter's new bytes from its arguments.
    type Pre = fn(&Budget, &[Value]) -> Result<u128, Error>;
    let input: Pre = |b, a| Ok(b.sizes(&a[..1.min(a.len())])?.bytes);
    let case: Pre = |b, a| Ok(3 * b.sizes(&a[..1.min(a.len())])?.bytes);
    let escaped: Pre = |b, a| Ok(6 * b.sizes(&a[..1.min(a.len())])?.bytes);
    let join: Pre = |b, a| {
        let s = b.sizes(&a[..1.min(a.len())])?;
        let sep = a.get(1).and_then(|v| v.as_str()).map_or(0, str::len) as u128;
        Ok(s.bytes + s.items.saturating_mul(sep))
    };
    let replace: Pre = |b, a| {
        let s = b.sizes(&a[..1.min(a.len())])?.bytes;
        let new = a.get(2).and_then(|v| v.as_str()).map_or(0, str::len) as u128;
        Ok(s + (s + 1).saturating_mul(new))
    };
    let indent: Pre = |b, a| {
        let s = b.sizes(&a[..1.min(a.len())])?.bytes;
        let w = int_arg(a.get(1)).max(int_arg(kwarg(a, "width").as_ref()));
        Ok(s + (s + 2).saturating_mul(w))
    };
    let format: Pre = |b, a| {
        let fmt = a.first().and_then(|v| v.as_str()).unwrap_or("");
        Ok(fmt.len() as u128 + 6 * b.sizes(a)?.bytes + digit_sum(fmt))
    };
    let pretty: Pre = |b, a| {
        let s = b.sizes(&a[..1.min(a.len())])?;
        let indent = int_arg(a.get(1))
            .max(int_arg(kwarg(a, "indent").as_ref()))
            .max(4);
        Ok(s.bytes
            .saturating_mul(6)
            .saturating_add(s.items.saturating_mul(indent.saturating_mul(s.depth + 1))))
    };
    let count: Pre = |b, a| {
        let s = b.sizes(&a[..1.min(a.len())])?;
        Ok(s.bytes + (s.items + int_arg(a.get(1))).saturating_mul(16))
    };
    let all: Pre = |b, a| Ok(b.sizes(a)?.bytes);
    // a list of one value per character / line / item: 32 bytes each
    let explode: Pre = |b, a| Ok(32 * b.sizes(&a[..1.min(a.len())])?.bytes);
    let table: Vec<(&'static str, Value, Pre)> = vec![
        ("safe", Value::from_function(f::safe), input),
        ("escape", Value::from_function(f::escape), escaped),
        ("e", Value::from_function(f::escape), escaped),
        ("lower", Value::from_function(f::lower), case),
        ("upper", Value::from_function(f::upper), case),
        ("title", Value::from_function(f::title), case),
        ("capitalize", Value::from_function(f::capitalize), case),
        ("replace", Value::from_function(f::replace), replace),
        ("dictsort", Value::from_function(f::dictsort), input),
        ("items", Value::from_function(f::items), input),
        ("reverse", Value::from_function(f::reverse), input),
        ("trim", Value::from_function(f::trim), input),
        ("join", Value::from_function(f::join), join),
        ("split", Value::from_function(f::split), explode),
        ("lines", Value::from_function(f::lines), explode),
        ("sort", Value::from_function(f::sort), input),
        ("list", Value::from_function(f::list), explode),
        ("string", Value::from_function(f::string), input),
        ("batch", Value::from_function(f::batch), count),
        ("slice", Value::from_function(f::slice), count),
        ("sum", Value::from_function(f::sum), all),
        ("indent", Value::from_function(f::indent), indent),
        ("select", Value::from_function(f::select), input),
        ("reject", Value::from_function(f::reject), input),
        ("selectattr", Value::from_function(f::selectattr), input),
        ("rejectattr", Value::from_function(f::rejectattr), input),
        ("map", Value::from_function(f::map), input),
        ("groupby", Value::from_function(f::groupby), input),
        ("unique", Value::from_function(f::unique), input),
        ("chain", Value::from_function(f::chain), all),
        ("zip", Value::from_function(f::zip), all),
        ("pprint", Value::from_function(f::pprint), pretty),
        ("format", Value::from_function(f::format), format),
        ("tojson", Value::from_function(f::tojson), pretty),
    ];
    for (name, filter, pre) in table {
        let b = budget.clone();
        env.add_filter(
            name,
            move |state: &State, args: Rest<Value>| -> Result<Value, Error> {
                b.charge(pre(&b, &args)?)?;
                filter.call(state, &args)
            },
        );
    }
}
