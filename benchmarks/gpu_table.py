"""The GPU check's table, from gpu_bench.json's content (printed last by gpu_bench.py and gpu_check.sh)."""

from __future__ import annotations


def render(data: dict) -> str:
    st = data["stages"]
    lines = ["", "== GPU check ==" + ("  (dry run: tiny model on CPU; speeds mean nothing)" if data["meta"]["dry_run"]
                                       else ""), f"sizes: {data['meta']['sizes']}"]
    for name, s in st.items():
        if s["status"] != "ok":
            lines.append(f"{name:<10} FAILED after {s['seconds']} s: {s['error']}")
    if st.get("env", {}).get("status") == "ok":
        e = st["env"]
        lines.append(f"env: {e.get('gpu', 'cpu')} {e.get('capability', '')} torch {e['torch']} triton {e['triton']}")
    if st.get("kernels", {}).get("status") == "ok":
        k = st["kernels"]
        v = k["vocab"]
        lines.append(f"fused vocab pass: {v['fused_ms']} ms vs torch {v['torch_ms']} ms ({v['speedup']}x), "
                     f"argmax agreement {v['argmax_agreement']:.3f}")
        for g in k["grouped_gemm"]:
            sides = "  ".join(f"{n}: {g[f'{n}_ms']} ms (max diff {g[f'{n}_max_diff']:.2g})"
                              for n in ("grouped", "triton") if f"{n}_ms" in g)
            lines.append(f"grouped GEMM {g['rows']} rows: loop {g['loop_ms']} ms  {sides}  [{k['grouped_backend']}]")
    for name in ("dgserve", "fp8"):
        if st.get(name, {}).get("status") == "ok":
            lines += _levels(name, st[name])
    if st.get("reference", {}).get("status") == "ok":
        r = st["reference"]
        lines.append(f"transformers batch 1: {r['e2e_tok_s']} tok/s end to end ({r['tokens']} tokens); dgserve/"
                     f"transformers {r.get('speedup_e2e_b1')}x; decoder passes {r['decoder_passes']} (same as "
                     f"dgserve: {r['same_passes']}), same tokens {r.get('same_tokens_fraction')}")
    if st.get("parity", {}).get("status") == "ok":
        p = st["parity"]
        rng = p["rng"]
        lines.append(f"parity (float32, tiny): forced logits max diff {p['logits_max_diff']:.2e}; RNG calls "
                     f"ref {rng['reference_calls']} / dgserve {rng['dgserve_calls']}, same consumption "
                     f"{rng['same_consumption']} (first divergence {rng['first_divergence']}); token-exact "
                     f"{[s['token_exact'] for s in p['seeds']]}, first diffs {[s['first_diff'] for s in p['seeds']]}")
    return "\n".join(lines)


def _levels(name: str, d: dict) -> list[str]:
    lines = [f"{name} (experts {d['experts_dtype']}): weights {d['weight_gb']} GB, batch-1 ceiling "
             f"{d['ceiling_tok_s_b1']} tok/s (reached {d.get('b1_fraction_of_ceiling')})",
             f"{'batch':>6}{'decode tok/s':>14}{'e2e tok/s':>11}{'step ms':>9}{'floor ms':>10}{'bound':>9}"
             f"{'of floor':>10}{'x b1':>7}{'HBM GiB':>9}{'graphs':>8}{'vs bf16':>9}"]
    for lv in d["levels"]:
        graphs = "yes" if lv.get("cuda_graphs") else "no"
        lines.append(f"{lv['batch']:>6}{lv['decode_tok_s']:>14}{lv['e2e_tok_s']:>11}{lv['step_ms_p50']:>9}"
                     f"{lv['floor_ms']:>10}{lv['bound']:>9}{lv['roofline_fraction']:>10}"
                     f"{lv.get('gain_over_b1', ''):>7}{lv.get('hbm_peak_gib', '-'):>9}{graphs:>8}"
                     f"{lv.get('speed_vs_bf16', ''):>9}")
    return lines
