"""Model of the shared-dS band ring backward's protocol (band_ring_backward_shared_ds_kernel in
cuda/attention_band_wgmma.cu; written before its first GPU run, session 13): ring full/empty with a producer,
ds_full/ds_empty per chunk buffer, warpgroup A (dK/dV, stores owned dS chunks) and B (dQ with rolling accumulators,
boundary recomputes). Random interleavings; checks deadlock-freedom, buffer reuse order, and that every owned
segment's dQ gets exactly its contributions (keys j-1, j, j+1 inside the sequence) and is stored once."""
import random, sys

KRING, KRUN = 4, 16

def pieces_for(lengths):
    tiles = []  # (seq, local tile)
    for s, L in enumerate(lengths):
        n = (L + 63) // 64
        tiles += [(s, t) for t in range(n)]
    runs = [tiles[i:i + KRUN] for i in range(0, len(tiles), KRUN)]
    out = []
    for run in runs:
        ps = []
        for s, t in run:
            if ps and ps[-1]['seq'] == s:
                ps[-1]['last'] = t
            else:
                ps.append({'seq': s, 'first': t, 'last': t})
        for p in ps:
            n = (lengths[p['seq']] + 63) // 64
            p['seg_lo'] = max(p['first'] - 1, 0)
            p['seg_hi'] = min(p['last'] + 1, n - 1)
        out.append(ps)
    return out

def simulate(ps, rng):
    # ring state
    full_phase = [0] * KRING   # completed phases of full[slot]
    empty_arrivals = [0] * KRING  # arrivals (A+B) per slot use, 2 per use
    ring_seg = {}  # ring position g -> (piece index, segment)
    ds_full = [0] * 3   # completed uses stored by A
    ds_empty = [0] * 3  # completed uses released by B
    ds_content = [None] * 3
    contributions = {}  # (piece seq, segment) -> list of key segments
    stored = {}
    def producer():
        g = 0
        for pi, p in enumerate(ps):
            for j in range(p['seg_lo'], p['seg_hi'] + 1):
                slot = g % KRING
                if g >= KRING:
                    while empty_arrivals[slot] < 2 * (g // KRING):
                        yield
                ring_seg[g] = (pi, j)
                full_phase[slot] += 1
                g += 1
    def wait_seg(g_base, p, j):
        g = g_base + j - p['seg_lo']
        while full_phase[g % KRING] < g // KRING + 1:
            yield
        assert ring_seg[g][1] == j
    def consumer(kind):
        g_base = 0
        uses = [0, 0, 0]
        acc = {}
        for pi, p in enumerate(ps):
            for i in range(p['first'], p['last'] + 1):
                yield from wait_seg(g_base, p, i)
                if kind == 'B' and i == p['first']:
                    acc[i] = []
                    if p['seg_lo'] < p['first']:
                        yield from wait_seg(g_base, p, i - 1)
                        acc[i].append(i - 1)
                if kind == 'B' and i + 1 <= p['last']:
                    acc[i + 1] = []
                for c in range(3):
                    j = i - 1 + c
                    if j < p['seg_lo'] or j > p['seg_hi']:
                        continue
                    owned = p['first'] <= j <= p['last']
                    if kind == 'A':
                        yield from wait_seg(g_base, p, j)
                        if owned:
                            u = uses[c]; uses[c] += 1
                            while ds_empty[c] < u:
                                yield
                            ds_content[c] = (pi, i, j)
                            ds_full[c] += 1
                    else:
                        if not owned:
                            continue
                        u = uses[c]; uses[c] += 1
                        while ds_full[c] < u + 1:
                            yield
                        assert ds_content[c] == (pi, i, j), (ds_content[c], (pi, i, j))
                        acc[j].append(i)
                        ds_empty[c] += 1
                        if c == 0:
                            key = (p['seq'], j)
                            assert key not in stored
                            stored[key] = sorted(acc[j])
                if kind == 'B' and i == p['last']:
                    if p['seg_hi'] > p['last']:
                        yield from wait_seg(g_base, p, i + 1)
                        acc[i].append(i + 1)
                    key = (p['seq'], i)
                    assert key not in stored
                    stored[key] = sorted(acc[i])
                # release segment i-1
                if i - 1 >= p['seg_lo']:
                    empty_arrivals[(g_base + i - 1 - p['seg_lo']) % KRING] += 1
            for j in range(p['last'], p['seg_hi'] + 1):
                empty_arrivals[(g_base + j - p['seg_lo']) % KRING] += 1
            g_base += p['seg_hi'] - p['seg_lo'] + 1
    actors = {'P': producer(), 'A': consumer('A'), 'B': consumer('B')}
    steps = 0
    while actors:
        name = rng.choice(list(actors))
        try:
            next(actors[name])
        except StopIteration:
            del actors[name]
        steps += 1
        if steps > 200000:
            raise RuntimeError('deadlock (no progress)')
    return stored

def check(lengths, seeds=30):
    runs = pieces_for(lengths)
    for ps in runs:
        for sd in range(seeds):
            stored = simulate(ps, random.Random(sd))
            for p in ps:
                n = (lengths[p['seq']] + 63) // 64
                for j in range(p['first'], p['last'] + 1):
                    want = [k for k in (j - 1, j, j + 1) if 0 <= k < n]
                    assert stored[(p['seq'], j)] == want, (lengths, p, j, stored[(p['seq'], j)], want)
    return len(runs)

if __name__ == '__main__':
    cases = [[1, 3, 64, 65, 700, 1023, 5, 1024, 1025, 1088, 2100, 130], [8192, 1, 65, 3, 200, 130], [64] * 40,
             [1] * 20, [2100], [65, 63, 129, 1]]
    for c in cases:
        print(c[:6], '...', 'runs', check(c))
    print('ok')
