// difract-ext: one feature's dashboard (DashboardStore.feature_payload), in plain DOM (no
// libraries), shared by the graph page's feature pane and the static per-dictionary pages
// (difract_ext/graphs/pages.py copies this file beside them, so they open from file://).
//
// renderDashboard(container, payload, {base, maxPerStep}) draws: title (site #index "label",
// F1), statistics (max, density, quantiles), the activation profile over t, the strongest
// prompt tokens, and per denoising step the top examples as thumbnails: the generated image with
// the feature's patch heat-map over it (img features) and the prompt with its tokens highlighted
// (txt features). `base` prefixes example image paths (relative to the dashboard folder).
// renderExample(container, example, actMax, base) draws one thumbnail.
window.difractDashboard = (function () {
  var SVG = 'http://www.w3.org/2000/svg'

  function el(tag, cls, parent, text) {
    var node = document.createElement(tag)
    if (cls) node.className = cls
    if (text !== undefined && text !== null) node.textContent = text
    if (parent) parent.appendChild(node)
    return node
  }

  function svgEl(tag, attrs, parent) {
    var node = document.createElementNS(SVG, tag)
    Object.entries(attrs || {}).forEach(([k, v]) => node.setAttribute(k, v))
    if (parent) parent.appendChild(node)
    return node
  }

  function fmt(v, digits) {
    if (v === null || v === undefined || !isFinite(v)) return '–'
    var a = Math.abs(v)
    if (a !== 0 && (a < 1e-3 || a >= 1e4)) return v.toExponential(2)
    return v.toFixed(digits === undefined ? 3 : digits)
  }

  // heat colour of a share in [0, 1]: transparent → orange → red
  function heat(share) {
    share = Math.max(0, Math.min(1, share))
    var g = Math.round(160 * (1 - share))
    return 'rgba(255,' + g + ',0,' + (0.15 + 0.7 * share).toFixed(3) + ')'
  }

  function featureTitle(p) {
    return p.site + ' #' + p.index + (p.label ? ' "' + p.label + '"' : '')
  }

  function renderExample(container, ex, actMax, base) {
    var box = el('div', 'difract-example', container)
    box.title = ex.prompt + ' · seed ' + ex.seed + ' · step ' + ex.step +
      (ex.t !== null && ex.t !== undefined ? ' · t=' + fmt(ex.t, 3) : '') + ' · max ' + fmt(ex.act)
    var imgBox = el('div', 'difract-thumb', box)
    var rows = ex.grid[0], cols = ex.grid[1]
    if (ex.image) {
      var img = el('img', 'difract-thumb-img', imgBox)
      img.src = (base || '') + ex.image
      img.alt = ex.prompt
    }
    var patchActs = ex.patch_acts || []
    if (patchActs.some(v => v > 0)) {
      var svg = svgEl('svg', {viewBox: '0 0 ' + cols + ' ' + rows, preserveAspectRatio: 'none',
        class: 'difract-heat'}, imgBox)
      patchActs.forEach((v, i) => {
        if (!(v > 0)) return
        var r = svgEl('rect', {x: i % cols, y: Math.floor(i / cols), width: 1, height: 1,
          fill: heat(v / (actMax || 1)), class: 'heat'}, svg)
        svgEl('title', {}, r).textContent = 'r' + Math.floor(i / cols) + 'c' + (i % cols) + ': ' + fmt(v)
      })
    }
    el('div', 'difract-example-act', box, 'act ' + fmt(ex.act, 2))
    var tokens = el('div', 'difract-example-tokens', box)
    var tokenActs = ex.token_acts || []
    ;(ex.tokens || []).forEach((tok, i) => {
      if (tok === '<pad>') return
      var span = el('span', 'difract-tok', tokens, tok)
      var v = tokenActs[i] || 0
      if (v > 0) {
        span.style.background = heat(v / (actMax || 1))
        span.title = fmt(v)
        span.classList.add('active')
      }
    })
    return box
  }

  function renderProfile(container, profile) {
    if (!profile || !profile.mean || !profile.mean.length) return
    var w = 220, h = 60, pad = 18
    var n = profile.mean.length
    var max = Math.max(...profile.mean, 1e-12)
    var box = el('div', 'difract-profile', container)
    el('div', 'difract-dash-h', box, 'activation over the denoising steps (mean per position)')
    var svg = svgEl('svg', {width: w, height: h + pad, class: 'difract-profile-svg'}, box)
    var xs = i => pad + (n > 1 ? i * (w - 2 * pad) / (n - 1) : (w - 2 * pad) / 2)
    var ys = v => 4 + (h - 8) * (1 - v / max)
    svgEl('path', {d: profile.mean.map((v, i) => (i ? 'L' : 'M') + xs(i) + ',' + ys(v)).join(''),
      fill: 'none', stroke: '#d0400b', 'stroke-width': 2}, svg)
    profile.mean.forEach((v, i) => {
      var c = svgEl('circle', {cx: xs(i), cy: ys(v), r: 2.5, fill: '#d0400b'}, svg)
      svgEl('title', {}, c).textContent = 'step ' + i + ': mean ' + fmt(v) +
        ', fires at ' + fmt(100 * (profile.frequency[i] || 0), 1) + '% of positions'
      var t = profile.t && profile.t[i] !== undefined ? 't=' + fmt(profile.t[i], 2) : 's' + i
      var lab = svgEl('text', {x: xs(i), y: h + 12, 'text-anchor': 'middle', 'font-size': 9,
        fill: '#666'}, svg)
      lab.textContent = t
    })
  }

  function renderDashboard(container, p, opts) {
    opts = opts || {}
    container.innerHTML = ''
    var root = el('div', 'difract-dash', container)
    var head = el('div', 'difract-dash-title', root, featureTitle(p))
    if (p.label_f1 !== null && p.label_f1 !== undefined) {
      el('span', 'difract-dash-f1', head, ' F1 ' + fmt(p.label_f1, 2))
    }
    var q = p.quantiles || {}
    el('div', 'difract-dash-stats', root,
      p.kind + ' · max ' + fmt(p.act_max, 3) + ' · fires at ' +
      fmt(100 * (p.activation_frequency || 0), 2) + '% of positions · median ' + fmt(q['0.5']) +
      ' · q99 ' + fmt(q['0.99']))
    renderProfile(root, p.profile)
    if (p.top_tokens && p.top_tokens.length) {
      var tt = el('div', 'difract-top-tokens', root)
      el('span', 'difract-dash-h', tt, 'strongest prompt tokens: ')
      p.top_tokens.forEach(t => el('span', 'difract-tok active', tt, t.token).title = fmt(t.mean_act))
    }
    var legend = el('div', 'difract-dash-legend', root)
    el('span', 'difract-legend-swatch', legend).style.background =
      'linear-gradient(to right,' + heat(0) + ',' + heat(0.5) + ',' + heat(1) + ')'
    el('span', '', legend, ' activation / max (' + fmt(p.act_max, 2) + '), over image patches and ' +
      'prompt tokens')
    var byStep = new Map()
    ;(p.examples || []).forEach(ex => {
      if (!byStep.has(ex.step)) byStep.set(ex.step, [])
      byStep.get(ex.step).push(ex)
    })
    var maxPerStep = opts.maxPerStep || 6
    Array.from(byStep.keys()).sort((a, b) => a - b).forEach(step => {
      var exs = byStep.get(step)
      var row = el('div', 'difract-step', root)
      el('div', 'difract-dash-h', row, 'step ' + step +
        (exs[0].t !== null && exs[0].t !== undefined ? ' (t=' + fmt(exs[0].t, 2) + ')' : '') +
        ': top ' + Math.min(maxPerStep, exs.length) + ' of ' + exs.length)
      var strip = el('div', 'difract-examples', row)
      exs.slice(0, maxPerStep).forEach(ex => renderExample(strip, ex, p.act_max, opts.base))
    })
    if (!byStep.size) el('div', 'difract-dash-h', root, 'no example where this feature fires')
    return root
  }

  return {renderDashboard, renderExample, featureTitle, heat, fmt, el}
})()
