// difract-ext: an image panel for attribution graphs of FLUX denoising steps.
//
// Shows the generated image with the patch grid over it and colours the patches (a legend says
// how; the overlay is translucent and can be switched off so the picture stays readable):
//  - nothing selected: how many graph nodes sit on each patch;
//  - a node hovered or clicked: the summed weight of its incoming edges per source patch
//    (green positive, purple negative, as the link colours), its own patch outlined; a feature
//    also gets every patch it sits on in the graph outlined (dashed).
// Clicking a patch lists the graph's features at that patch (by activation); clicking one of
// them selects it. Text positions get the same numbers as a bar list under the image. The
// graph's faithfulness summary ({slug}.report.json: faithfulness.summary, replacement and
// completeness scores) is shown under the title when there is one.
// Reads graph metadata written by difract_ext.graphs.files: grid, positions (one entry per
// shown column: {pos, kind, row, col, label}), image (file name beside the graph JSON),
// prompt, step, num_inference_steps, timestep, seed.
window.initDifractImage = function ({visState, renderAll, data, cgSel}) {
  var sel = cgSel.select('.difract-image').html('')
  if (!sel.node()) return
  var meta = data.metadata
  var positions = meta.positions || []
  var grid = meta.grid || [0, 0]
  var nRows = grid[0], nCols = grid[1]
  var fmt3 = d3.format('+.3f')

  // DOM markers that tests and scripts can read
  document.body.dataset.difractSlug = meta.slug
  document.body.dataset.difractNodes = String(data.nodes.length)

  var header = sel.append('div.difract-header')
  header.append('div.difract-title').text(
    'step ' + meta.step + (meta.num_inference_steps ? '/' + meta.num_inference_steps : '') +
    ' · t=' + (typeof meta.timestep === 'number' ? meta.timestep.toFixed(3) : '?') +
    (meta.seed !== undefined && meta.seed !== null ? ' · seed ' + meta.seed : ''))
  header.append('div.difract-prompt').text(meta.prompt || '').at({title: meta.prompt || ''})
  var faithSel = header.append('div.difract-faithfulness').st({display: 'none'})

  var row = sel.append('div.difract-image-row')
  var left = row.append('div.difract-image-left')
  var box = left.append('div.difract-image-box')
    .st({aspectRatio: nCols && nRows ? nCols + ' / ' + nRows : '1 / 1'})
  if (meta.image) {
    box.append('img.difract-generated').at({src: './graph_data/' + meta.image, alt: 'generated image'})
  }
  var svg = box.append('svg.difract-patches')
    .at({viewBox: '0 0 ' + Math.max(nCols, 1) + ' ' + Math.max(nRows, 1), preserveAspectRatio: 'none'})

  var patches = d3.range(nRows * nCols).map(i => ({row: Math.floor(i / nCols), col: i % nCols, i}))
  var patchSel = svg.appendMany('rect.patch', patches)
    .at({x: d => d.col, y: d => d.row, width: 1, height: 1})
    .on('click', (ev, d) => { picked = picked === d.i ? null : d.i; render() })
  patchSel.append('title')
  var featureOutlineG = svg.append('g.difract-feature-outlines')
  var pickedOutline = svg.append('rect.difract-picked').at({width: 1, height: 1, display: 'none'})
  var outline = svg.append('rect.difract-outline').at({width: 1, height: 1, display: 'none'})

  var controls = left.append('div.difract-controls')
  var overlayOn = true
  controls.append('label').html("<input type='checkbox' checked> overlay")
    .select('input').on('change', function () { overlayOn = this.checked; render() })
  var legendSel = left.append('div.difract-legend')

  var side = row.append('div.difract-image-side')
  var patchListSel = side.append('div.difract-patch-features')
  var caption = sel.append('div.difract-caption')
  var tokenSel = sel.append('div.difract-tokens')

  var idToNode = data.nodes.idToNode || {}
  var greenPurple = v => d3.interpolatePRGn(0.5 + 0.5 * d3.clamp(-1, v, 1))
  var countColor = v => d3.interpolateOranges(0.25 + 0.75 * v)
  var picked = null  // index of the clicked patch

  // ctx_idx of each patch that has a column in the graph
  var patchCtx = new Map()
  positions.forEach((p, ctx) => { if (p.kind === 'img') patchCtx.set(p.row * nCols + p.col, ctx) })

  function positionOf(node) {
    return node ? positions[node.ctx_idx] : undefined
  }

  function selectedNode() {
    return idToNode[visState.hoveredNodeId] || idToNode[visState.clickedId] || null
  }

  // value per shown column (ctx_idx) for the current mode
  function columnValues(node) {
    var values = new Map()
    if (!node) {
      data.nodes.forEach(d => {
        if (d.feature_type === 'logit') return
        values.set(d.ctx_idx, (values.get(d.ctx_idx) || 0) + 1)
      })
      return values
    }
    ;(node.sourceLinks || []).forEach(link => {
      var ctx = link.sourceNode.ctx_idx
      values.set(ctx, (values.get(ctx) || 0) + link.weight)
    })
    return values
  }

  function renderLegend(node, maxAbs) {
    legendSel.html('')
    var bar = legendSel.append('div.difract-legend-bar')
    var stops = node ? [-1, -0.5, 0, 0.5, 1].map(v => greenPurple(v)) : [0, 0.5, 1].map(countColor)
    bar.st({background: 'linear-gradient(to right,' + stops.join(',') + ')'})
    var ends = legendSel.append('div.difract-legend-ends')
    ends.append('span').text(node ? fmt3(-maxAbs) : '1')
    ends.append('span').text(node ? '0' : '')
    ends.append('span').text(node ? fmt3(maxAbs) : String(maxAbs))
    legendSel.append('div.difract-legend-text').text(node
      ? 'colour: summed input weight from each patch to the selected node (purple < 0 < green); box: its patch; dashed: same feature'
      : 'colour: graph nodes per patch; click a patch for its features')
  }

  function renderPatchList() {
    patchListSel.html('')
    if (picked === null) {
      patchListSel.append('div.difract-dash-h').text('Click a patch to see the features active there.')
      pickedOutline.at({display: 'none'})
      return
    }
    var r = Math.floor(picked / nCols), c = picked % nCols
    pickedOutline.at({x: c, y: r, display: null})
    var ctx = patchCtx.get(picked)
    var feats = ctx === undefined ? [] : data.nodes.filter(d => d.ctx_idx === ctx && d.difract)
    feats = d3.sort(feats, d => -(d.activation || 0))
    patchListSel.append('div.difract-dash-h').text('features at r' + r + 'c' + c +
      (feats.length ? ' (' + feats.length + ', by activation)' : ': none in this graph'))
    patchListSel.appendMany('div.difract-patch-feature', feats)
      .text(d => (d.ppClerp || difract.name(d, meta)) + '  ' + d3.format('.3f')(d.activation || 0))
      .classed('clicked', d => d.nodeId === visState.clickedId)
      .on('click', (ev, d) => utilCg.clickFeature(visState, renderAll, d, ev.metaKey || ev.ctrlKey))
  }

  function render() {
    var node = selectedNode()
    var values = columnValues(node)
    var byPatch = new Map()
    var textRows = []
    values.forEach((v, ctx) => {
      var p = positions[ctx]
      if (!p) return
      if (p.kind === 'img') byPatch.set(p.row * nCols + p.col, v)
      else if (p.kind === 'txt') textRows.push({label: p.label, value: v, pos: p.pos})
    })
    var maxAbs = d3.max(Array.from(values.values()), Math.abs) || 1

    patchSel
      .at({
        fill: (d, i) => {
          if (!byPatch.has(i) || !overlayOn) return 'none'
          var v = byPatch.get(i) / maxAbs
          return node ? greenPurple(v) : countColor(v)
        },
        fillOpacity: (d, i) => byPatch.has(i) && overlayOn ? (node ? 0.5 : 0.3) : 0,
      })
      .select('title')
      .text((d, i) => 'img r' + d.row + 'c' + d.col +
        (byPatch.has(i) ? (node ? ': ' + fmt3(byPatch.get(i)) : ': ' + byPatch.get(i) + ' nodes') : ''))

    var own = positionOf(node)
    if (own && own.kind === 'img') outline.at({x: own.col, y: own.row, display: null})
    else outline.at({display: 'none'})

    // every patch the selected feature sits on in this graph
    var same = node && node.difract ? data.nodes.filter(d => d.difract &&
      d.difract.site === node.difract.site && d.difract.feature === node.difract.feature &&
      d.difract.patch) : []
    featureOutlineG.html('').appendMany('rect.difract-feature-outline', same)
      .at({x: d => d.difract.patch[1], y: d => d.difract.patch[0], width: 1, height: 1})

    caption.text(node
      ? 'inputs to ' + (node.ppClerp || difract.name(node, meta)) + ', summed per source position'
      : 'graph nodes per position (hover or click a node to see its inputs)')
    renderLegend(node, node ? maxAbs : d3.max(Array.from(values.values())) || 1)
    renderPatchList()

    textRows = d3.sort(textRows, d => d.pos)
    var rowSel = tokenSel.html('').appendMany('div.difract-token', textRows)
    rowSel.append('span.difract-token-label').text(d => d.label)
    rowSel.append('span.difract-token-bar').st({
      width: d => Math.round(60 * Math.abs(d.value) / maxAbs),
      background: d => node ? greenPurple(d.value / maxAbs) : d3.interpolateOranges(0.6),
    })
    rowSel.append('span.difract-token-value')
      .text(d => node ? fmt3(d.value) : d.value)
  }

  // the faithfulness summary of the graph's report, when there is one
  fetch('./report/' + encodeURIComponent(meta.slug) + '.json', {cache: 'no-cache'})
    .then(r => r.ok ? r.json() : null)
    .catch(() => null)
    .then(report => {
      if (!report) return
      var items = Object.entries(report.faithfulness?.summary || {})
      ;['replacement_score', 'completeness_score'].forEach(k => {
        if (typeof report[k] === 'number' && !items.some(([n]) => n === k)) items.push([k, report[k]])
      })
      items = items.filter(([, v]) => typeof v === 'number')
      if (!items.length) return
      faithSel.st({display: null}).html('')
      var text = ([k, v]) => k.replace(/_/g, ' ') + ' ' + d3.format('.3~g')(v)
      faithSel.at({title: items.map(text).join('\n')})
      faithSel.append('span.difract-dash-h').text('faithfulness: ')
      var shownItems = 4
      var itemSel = faithSel.appendMany('span.difract-faith-item', items).text(text)
        .st({display: (d, i) => i < shownItems ? null : 'none'})
      if (items.length > shownItems) {
        faithSel.append('a.difract-faith-more').text(' +' + (items.length - shownItems) + ' more')
          .at({href: '#'})
          .on('click', ev => {
            ev.preventDefault()
            itemSel.st({display: null})
            d3.select(ev.target).remove()
          })
      }
    })

  renderAll.clickedId.fns['difractImage'] = render
  renderAll.hoveredId.fns['difractImage'] = render
  render()
}

window.init?.()
